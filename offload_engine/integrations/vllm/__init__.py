"""tbrun's token selection inside vLLM (CPU build), enabled by ``TBRUN_VLLM``.

Installed with ``pip install 'tbrun[vllm]'`` and registered as the ``tbrun`` entry of vLLM's
``vllm.general_plugins`` group: vLLM calls ``register()`` in every process it starts. With
``TBRUN_VLLM`` unset or empty, ``register()`` returns at once and vLLM is untouched; a bad value
raises ``ConfigError`` there, so vLLM stops at start with one message. See docs/vllm.md.
"""

from __future__ import annotations

import os

from .config import ENV_VAR, VllmPluginConfig, parse_config

__all__ = ["ENV_VAR", "VllmPluginConfig", "parse_config", "register"]


def register() -> None:
    """vLLM's plugin hook: parse ``TBRUN_VLLM`` and, if set, patch vLLM's CPU attention path."""
    config = parse_config(os.environ.get(ENV_VAR))
    if config is None:
        return
    from .plugin import install

    install(config)
