"""tbrun's library: long-context generation with the KV cache offloaded to host memory and a
learned predictor (TokenButler) choosing which tokens each layer and KV head attends to.

The names below are imported when first used (PEP 562), so that ``import offload_engine.config``
(the command line's option parsing, ``tbrun --help``) does not load torch and transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

_EXPORTS = {
    "Budget": "config", "EngineConfig": "config", "KVMode": "config", "SamplingConfig": "config",
    "SelectionConfig": "config", "parse_context": "config",
    "ContinuationScore": "engine", "Engine": "engine", "GenerationResult": "engine", "encode_prompt": "engine",
    "TbrunError": "errors",
    "ModelAdapter": "models", "load_model": "models",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig, parse_context
    from .engine import ContinuationScore, Engine, GenerationResult, encode_prompt
    from .errors import TbrunError
    from .models import ModelAdapter, load_model

__getattr__ = lazy_exports(__name__, _EXPORTS)
