"""The zero-copy gather as a Triton kernel (imported on first use).

The kernel reads the selected fragments straight from mapped pinned host memory: under unified
virtual addressing a pinned host tensor has a device address (Triton's launcher resolves it), so
only the selected bytes cross the bus, with no staging buffer and no host synchronisation.

It is checked without a GPU in two ways (tests/test_gather_triton.py): run by Triton's
interpreter on CPU tensors (``launch(..., kernel=interpreted_kernel())``) against plain indexing,
and compiled for sm_90 to PTX, where the address arithmetic must be 64-bit and the loads and
stores 16-byte vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 2048  # 32-bit words (8 KiB) per program: enough loads in flight to hide bus latency
NUM_WARPS = 4


@triton.jit
def _gather_rows(
    src, positions, slots, counts, dst, m,
    src_head, src_row, dst_head, dst_row, pos_head, slot_head,
    ROW_WORDS: tl.constexpr, ROW_BLOCK: tl.constexpr, FRAGS: tl.constexpr, HAS_COUNTS: tl.constexpr,
):
    # Program (f, h) copies fragments j in [f * FRAGS, (f + 1) * FRAGS) of KV head h, for j below
    # the head's real count (counts[h], read on the device: padding entries move no bytes).
    # src/dst strides are in 32-bit words, positions/slots strides in elements. Every offset is
    # int64: a store over 4 GiB has word offsets past 2**31.
    head = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * FRAGS + tl.arange(0, FRAGS)  # [FRAGS]
    live = j < m
    if HAS_COUNTS:
        live = live & (j < tl.load(counts + head))
    pos = tl.load(positions + head * pos_head + j, mask=live, other=0)  # [FRAGS] int64
    slot = tl.load(slots + head * slot_head + j, mask=live, other=0)  # [FRAGS] int64
    word = tl.arange(0, ROW_BLOCK)  # [ROW_BLOCK]; contiguous, so accesses become 16-byte vectors
    mask = live[:, None] & (word[None, :] < ROW_WORDS)  # [FRAGS, ROW_BLOCK]
    src_offset = head * src_head + pos[:, None] * src_row + word[None, :]
    dst_offset = head * dst_head + slot[:, None] * dst_row + word[None, :]
    tl.store(dst + dst_offset, tl.load(src + src_offset, mask=mask), mask=mask)


def launch_shape(row_words: int, m: int, heads: int) -> tuple[dict, tuple[int, int]]:
    """The constexprs and grid of one call: rows of ``row_words`` words, ``m`` entries per head."""
    row_block = triton.next_power_of_2(row_words)
    frags = max(1, BLOCK_WORDS // row_block)
    constants = {"ROW_WORDS": row_words, "ROW_BLOCK": row_block, "FRAGS": frags}
    return constants, (triton.cdiv(m, frags), heads)


def launch(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor | None,
           dst: torch.Tensor, kernel=None) -> None:
    """src ``[KvH, C, D]``; positions, slots ``[KvH, m]`` long contiguous; counts ``[KvH]`` long or
    None (all ``m`` real); dst ``[KvH, S, D]``. Rows are multiples of 4 bytes. ``kernel``: the
    compiled kernel by default, or ``interpreted_kernel()`` for CPU tensors."""
    # Reinterpret [KvH, T, D] as [KvH, T, D * itemsize / 4] words: one kernel for every dtype.
    src_w, dst_w = src.view(torch.int32), dst.view(torch.int32)
    heads, m = positions.shape
    constants, grid = launch_shape(src_w.shape[2], m, heads)
    (kernel or _gather_rows)[grid](
        src_w, positions, slots, positions if counts is None else counts, dst_w, m,
        src_w.stride(0), src_w.stride(1), dst_w.stride(0), dst_w.stride(1),
        positions.stride(0), slots.stride(0),
        HAS_COUNTS=counts is not None, num_warps=NUM_WARPS, **constants,
    )


def gather(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor,
           counts: torch.Tensor | None = None) -> None:
    """The CUDA entry: src pinned host, the rest on ``dst``'s device (checked by the caller).
    Runs on the current stream of ``dst``'s device."""
    with torch.cuda.device(dst.device):  # Triton launches on the current device's current stream
        launch(src, positions, slots, counts, dst)


def interpreted_kernel():
    """The same kernel run by Triton's interpreter (numpy, CPU tensors): for tests without a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_gather_rows.fn)


def compile_ptx(capability: int = 90, row_words: int = 64, has_counts: bool = True) -> str:
    """PTX of the kernel for ``sm_<capability>``, compiled on this machine with no GPU.

    Pointers and the store's and working set's strides carry the divisibility-by-16 hint the
    launcher gives them at run time (16-byte aligned buffers, head dims of 64 and up), so the PTX
    is the one that runs.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants, _ = launch_shape(row_words, 1, 1)
    constants["HAS_COUNTS"] = has_counts
    pointers = {"src": "*i32", "positions": "*i64", "slots": "*i64", "counts": "*i64", "dst": "*i32"}
    integers = ("m", "src_head", "src_row", "dst_head", "dst_row", "pos_head", "slot_head")
    signature = pointers | {name: "i64" for name in integers} | {name: "constexpr" for name in constants}
    # Row and head strides of the store and working set are whole 16-word multiples for head dims
    # of 64 and up; the plan's width m (and so its strides) is arbitrary.
    aligned = [name for name in signature if name in pointers or name in integers[1:5]]
    attrs = {(_gather_rows.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=_gather_rows, signature=signature, constexprs=constants, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    compiled = triton.compile(source, target=target, options={"num_warps": NUM_WARPS})
    return compiled.asm["ptx"]
