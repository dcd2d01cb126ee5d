"""The zero-copy gather as a Triton kernel (CUDA only; imported on first use).

The kernel reads the selected fragments straight from mapped pinned host memory: under unified
virtual addressing a pinned host tensor has a device address (Triton's launcher resolves it), so
only the selected bytes cross the bus, with no staging buffer and no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 2048  # 32-bit words (8 KiB) per program: enough loads in flight to hide bus latency


@triton.jit
def _gather_rows(
    src, positions, slots, dst, m,
    src_head, src_row, dst_head, dst_row, pos_head, slot_head,
    ROW_WORDS: tl.constexpr, ROW_BLOCK: tl.constexpr, FRAGS: tl.constexpr,
):
    # Program (f, h) copies fragments j in [f * FRAGS, (f + 1) * FRAGS) of KV head h.
    # src/dst strides are in 32-bit words, positions/slots strides in elements. Every offset is
    # int64: a store over 4 GiB has word offsets past 2**31.
    head = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * FRAGS + tl.arange(0, FRAGS)  # [FRAGS]
    live = j < m
    pos = tl.load(positions + head * pos_head + j, mask=live, other=0)  # [FRAGS] int64
    slot = tl.load(slots + head * slot_head + j, mask=live, other=0)  # [FRAGS] int64
    word = tl.arange(0, ROW_BLOCK)  # [ROW_BLOCK]; contiguous, so accesses become 16-byte vectors
    mask = live[:, None] & (word[None, :] < ROW_WORDS)  # [FRAGS, ROW_BLOCK]
    src_offset = head * src_head + pos[:, None] * src_row + word[None, :]
    dst_offset = head * dst_head + slot[:, None] * dst_row + word[None, :]
    tl.store(dst + dst_offset, tl.load(src + src_offset, mask=mask), mask=mask)


def gather(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor) -> None:
    """src ``[KvH, C, D]`` pinned host; positions, slots ``[KvH, m]`` long contiguous on the
    device; dst ``[KvH, S, D]`` on the device. Rows are multiples of 16 bytes (checked by the
    caller). Runs on the current stream of ``dst``'s device."""
    # Reinterpret [KvH, T, D] as [KvH, T, D * itemsize / 4] words: one kernel for every dtype.
    src_w, dst_w = src.view(torch.int32), dst.view(torch.int32)
    heads, m = positions.shape
    row_words = src_w.shape[2]
    row_block = triton.next_power_of_2(row_words)
    frags = max(1, BLOCK_WORDS // row_block)
    grid = (triton.cdiv(m, frags), heads)
    with torch.cuda.device(dst.device):  # Triton launches on the current device's current stream
        _gather_rows[grid](
            src_w, positions, slots, dst_w, m,
            src_w.stride(0), src_w.stride(1), dst_w.stride(0), dst_w.stride(1),
            positions.stride(0), slots.stride(0),
            ROW_WORDS=row_words, ROW_BLOCK=row_block, FRAGS=frags, num_warps=4,
        )
