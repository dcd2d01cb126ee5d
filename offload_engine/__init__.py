"""tbrun's library: long-context generation with the KV cache offloaded to host memory and a
learned predictor (TokenButler) choosing which tokens each layer and KV head attends to."""

from .config import Budget, EngineConfig, KVMode, SamplingConfig, SelectionConfig, parse_context
from .engine import ContinuationScore, Engine, GenerationResult, encode_prompt
from .errors import TbrunError
from .models import ModelAdapter, load_model

__all__ = [
    "Budget", "ContinuationScore", "Engine", "EngineConfig", "GenerationResult", "KVMode", "ModelAdapter",
    "SamplingConfig", "SelectionConfig", "TbrunError", "encode_prompt", "load_model", "parse_context",
]
__version__ = "0.1.0"
