"""A GGUF model's linear weights read at decode time from the file's own blocks.

transformers dequantises a GGUF file's weights to float32 on load, and every decode step on the CPU then streams
all of them from memory: 540 MB a step for the embedded SmolLM2-135M, whose file holds them as q4_1 (the
projections) and q8_0 (the embedding, tied to the output head) blocks, 92 MiB. ``attach_gguf_blocks`` reads those
blocks from the file and attaches each to the model's weight it stands for (``native.attach_weight_blocks``),
after checking that it widens to exactly that weight's values: the one-token kernels then compute the same sums,
bit for bit, from a sixth (q4_1) or a quarter (q8_0) of the bytes. Everything else (prefill, training, a GPU, a
weight that does not match) keeps the float32 weights, which stay in the model.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import native

# ggml block types the kernels read (native.BLOCK_BYTES), by their ggml type ids (ggml.h's GGML_TYPE_Q4_1, _Q8_0)
GGUF_BLOCK_FORMATS = {3: "q4_1", 8: "q8_0"}
# a decoder layer's GGUF tensor name -> its module's path in the Llama family's transformers models
LAYER_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


@dataclass(frozen=True)
class AttachedBlocks:
    """What ``attach_gguf_blocks`` did: the weights now read from blocks, their bytes against float32's, and the
    file's block tensors left to float32 (with why)."""

    matrices: int
    block_bytes: int
    float_bytes: int
    declined: tuple[str, ...]

    def summary(self) -> str:
        """What a decode step reads, in a few words (reports, ``tbrun generate``'s summary)."""
        return (f"{self.matrices} matrices from the GGUF file's q4_1 / q8_0 blocks ({self.block_bytes / 2**20:.0f} MiB, "
                f"float32 {self.float_bytes / 2**20:.0f} MiB)")

    def describe(self) -> str:
        """``summary`` and the file's block tensors left in float32, with why."""
        return self.summary() + (f"; left in float32: {', '.join(self.declined)}" if self.declined else "")


def gguf_file_of(source: str, extra: dict) -> Path | None:
    """The GGUF file a model was loaded from: ``extra``'s ``gguf_file`` in ``source``, or the file a converted
    copy records in its ``tbrun_source.json`` (``models.embedded_model_dir``); None for another model."""
    import json

    if "gguf_file" in extra:
        return Path(source) / extra["gguf_file"]
    record = Path(source) / "tbrun_source.json"
    if not record.is_file():
        return None
    try:
        named = json.loads(record.read_text()).get("gguf")
    except (OSError, ValueError):
        return None
    return Path(named) if named and Path(named).is_file() else None


def attach_gguf_blocks(model: nn.Module, gguf_path: str | Path) -> AttachedBlocks:
    """Attach the q4_1 / q8_0 blocks of ``gguf_path`` to the weights of ``model`` (float32, on the CPU) they widen
    to exactly. A decoder layer's seven projections are looked for at their Llama-family paths (q and k also in
    the row order transformers' GGUF loader gives them, ``_reverse_permute``), the embedding (``token_embd``)
    and the output head (``output``) at the output head; the check decides, so a file that is not the model's
    attaches nothing."""
    if native.kernels() is None:
        return AttachedBlocks(0, 0, 0, ())
    matrices = block_bytes = float_bytes = 0
    declined: list[str] = []
    try:
        tensors = block_tensors(gguf_path)
    except (OSError, ValueError) as exc:  # the model loaded from it, so this is unexpected: float32 throughout
        return AttachedBlocks(0, 0, 0, (f"the file's tensor index could not be read ({exc})",))
    for name, block_format, raw in tensors:
        target = _target_linear(model, name)
        if target is None:
            declined.append(f"{name} (no linear layer of the model)")
            continue
        blocks = _matching_blocks(model, name, raw, block_format, target.weight)
        if blocks is None:
            declined.append(f"{name} (its values are not the model's weight)")
            continue
        native.attach_weight_blocks(target.weight, blocks)
        matrices += 1
        block_bytes += blocks.blocks.numel()
        float_bytes += target.weight.numel() * 4
    return AttachedBlocks(matrices, block_bytes, float_bytes, tuple(declined))


def block_tensors(path: str | Path) -> list[tuple[str, str, np.ndarray]]:
    """The q4_1 / q8_0 tensors of a GGUF file: ``(name, format, rows)``, rows a read-only uint8 view ``[O, bytes a
    row]`` of the file (memory-mapped). Read from the file's index directly: gguf's ``GGUFReader`` builds an
    object for every metadata value (the tokenizer's ~100k strings) and takes ~2.5 s on the embedded model's
    file, this ~0.1 s. Raises ``ValueError`` for a file that is not GGUF version 2 or 3, or is cut short."""
    with open(path, "rb") as handle:
        head = handle.read(24)
        if len(head) < 24 or head[:4] != b"GGUF" or struct.unpack_from("<I", head, 4)[0] not in (2, 3):
            raise ValueError(f"{path} is not a GGUF file of version 2 or 3")
        tensor_count, kv_count = struct.unpack_from("<QQ", head, 8)
        index = _GgufIndex(handle)
        alignment = 32
        for _ in range(kv_count):
            key = index.string()
            value = index.value(index.u32())
            if key == "general.alignment":
                alignment = int(value)
        infos = []
        for _ in range(tensor_count):
            name = index.string()
            dims = [index.u64() for _ in range(index.u32())]
            infos.append((name, dims, index.u32(), index.u64()))
        data_start = -(-handle.tell() // alignment) * alignment
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    found = []
    for name, dims, type_id, offset in infos:
        block_format = GGUF_BLOCK_FORMATS.get(type_id)
        if block_format is None or len(dims) != 2 or dims[0] % native.WEIGHT_BLOCK:
            continue
        row = dims[0] // native.WEIGHT_BLOCK * native.BLOCK_BYTES[block_format]
        start = data_start + offset
        found.append((name, block_format, mapped[start:start + row * dims[1]].reshape(dims[1], row)))
    return found


class _GgufIndex:
    """Sequential reads of a GGUF file's metadata and tensor index (little-endian), values skipped cheaply."""

    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    STRING, ARRAY = 8, 9

    def __init__(self, handle):
        self.handle = handle

    def read(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError(f"{self.handle.name} ends inside its GGUF index (a partial download?)")
        return data

    def u32(self) -> int:
        return int.from_bytes(self.read(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.read(8), "little")

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in self.SCALARS:
            layout = self.SCALARS[kind]
            return struct.unpack(layout, self.read(struct.calcsize(layout)))[0]
        if kind == self.STRING:
            return self.string()
        if kind == self.ARRAY:
            item, count = self.u32(), self.u64()
            if item in self.SCALARS:  # skipped whole
                self.handle.seek(count * struct.calcsize(self.SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown GGUF metadata type {kind}")


def _target_linear(model: nn.Module, name: str) -> nn.Linear | None:
    """The linear layer a GGUF tensor's name stands for, if the model has it as a float32 CPU ``nn.Linear``."""
    if name in ("token_embd.weight", "output.weight"):
        module = getattr(model, "lm_head", None)
        embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
        if name == "token_embd.weight" and (module is None or embedding is None or module.weight is not embedding.weight):
            return None  # the embedding is the output head only where the two are tied
    else:
        match = _LAYER_NAME.match(name)
        path = LAYER_TENSORS.get(match.group(2)) if match else None
        layers = getattr(getattr(model, "model", None), "layers", None)
        if path is None or layers is None or int(match.group(1)) >= len(layers):
            return None
        module = layers[int(match.group(1))].get_submodule(path)
    if (type(module) is not nn.Linear or module.weight.dtype is not torch.float32 or not module.weight.is_cpu
            or not module.weight.is_contiguous()):
        return None
    return module


def _matching_blocks(model: nn.Module, name: str, raw: np.ndarray, block_format: str,
                     weight: torch.Tensor) -> native.WeightBlocks | None:
    """``raw`` (uint8 ``[O, bytes a row]``) as blocks that widen to exactly ``weight``'s values, in the file's row
    order or, for q and k, transformers' (``_reverse_permute``); None if neither."""
    if raw.ndim != 2 or raw.shape[0] != weight.shape[0]:
        return None
    orders = [raw]
    heads = _permuted_heads(model, name)
    if heads is not None:
        orders.append(_reverse_permute(raw, heads))
    for rows in orders:
        blocks = torch.from_numpy(np.ascontiguousarray(rows).copy())
        if torch.equal(widen(blocks, block_format), weight.detach()):
            return native.WeightBlocks(block_format, blocks)
    return None


def widen(blocks: torch.Tensor, block_format: str) -> torch.Tensor:
    """The float32 weights ``[O, I]`` of q4_1 or q8_0 blocks ``[O, I / 32 * bytes a block]`` (uint8), computed as
    gguf's dequantisation computes them (d q, then + m for q4_1: two roundings of which the first is exact)."""
    size = native.BLOCK_BYTES[block_format]
    rows = blocks.shape[0]
    grouped = blocks.view(rows, -1, size)
    d = grouped[..., 0:2].contiguous().view(torch.float16).float()
    if block_format == "q8_0":
        codes = grouped[..., 2:].contiguous().view(torch.int8).float()
        return (d * codes).reshape(rows, -1)
    m = grouped[..., 2:4].contiguous().view(torch.float16).float()
    packed = grouped[..., 4:]
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1).float()
    return (d * codes + m).reshape(rows, -1)


def _permuted_heads(model: nn.Module, name: str) -> int | None:
    """The head count of the row permutation transformers' GGUF loader undoes for the Llama family's q and k."""
    config = model.config
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _reverse_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """The rows of ``rows`` ``[O, ...]`` in the order transformers' ``LlamaTensorProcessor`` gives the dequantised
    weight (llama.cpp's converter interleaved each head's two RoPE halves): ``[heads, O / heads / 2, 2, ...]``
    with the last two row axes swapped."""
    if rows.shape[0] % (2 * heads):
        return rows
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)
