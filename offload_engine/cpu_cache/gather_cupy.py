"""The zero-copy gather as a cupy raw CUDA kernel (CUDA only; imported on first use).

Same contract as the Triton kernel: read the selected fragments straight from mapped pinned
host memory, one thread per 16-byte vector, on torch's current stream.
"""

from __future__ import annotations

import functools

import cupy
import numpy as np
import torch

VECTOR_BYTES = 16
THREADS = 256
MAX_BLOCKS_PER_HEAD = 4096  # the grid-stride loop covers the rest

_SOURCE = r"""
// Thread i of KV head h (blockIdx.y) copies 16-byte vector v of fragment j, with
// i = j * vecs + v, walking the head's real fragments (j < counts[h], or all m when counts is
// null: padding entries move no bytes) in a grid-stride loop.
// src/dst strides are in 16-byte vectors, positions/slots strides in elements.
// All index math is 64-bit, so stores beyond 4 GiB work.
extern "C" __global__ void gather_fragments_vec16(
    const uint4* __restrict__ src, const long long* __restrict__ positions,
    const long long* __restrict__ slots, const long long* __restrict__ counts, uint4* __restrict__ dst,
    const long long m, const long long vecs,
    const long long src_head, const long long src_row,
    const long long dst_head, const long long dst_row,
    const long long pos_head, const long long slot_head)
{
    const long long head = blockIdx.y;
    const long long real = (counts && counts[head] < m) ? counts[head] : m;
    const long long total = real * vecs;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long j = i / vecs;
        const long long v = i - j * vecs;
        const long long pos = positions[head * pos_head + j];
        const long long slot = slots[head * slot_head + j];
        dst[head * dst_head + slot * dst_row + v] = src[head * src_head + pos * src_row + v];
    }
}
"""


@functools.cache
def _kernel() -> cupy.RawKernel:
    return cupy.RawKernel(_SOURCE, "gather_fragments_vec16")


def _device_pointer(host: torch.Tensor) -> int:
    """The device address of pinned host memory (equal to the host address under UVA)."""
    try:
        pointer = cupy.cuda.runtime.pointerGetAttributes(host.data_ptr()).devicePointer
    except Exception:  # a runtime without the attribute: UVA maps pinned memory at its host address
        pointer = 0
    return int(pointer) or host.data_ptr()


def gather(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor,
           counts: torch.Tensor | None = None) -> None:
    """src ``[KvH, C, D]`` pinned host; positions, slots ``[KvH, m]`` long contiguous on the
    device; counts ``[KvH]`` long on the device or None; dst ``[KvH, S, D]`` on the device; rows,
    strides and addresses 16-byte aligned (checked by the caller)."""
    item = src.element_size()
    heads, m = positions.shape
    vecs = src.shape[2] * item // VECTOR_BYTES  # 16-byte vectors per fragment
    blocks = min(MAX_BLOCKS_PER_HEAD, (m * vecs + THREADS - 1) // THREADS)
    pointers = (_device_pointer(src), positions.data_ptr(), slots.data_ptr(),
                0 if counts is None else counts.data_ptr(), dst.data_ptr())
    sizes = (
        m, vecs,
        src.stride(0) * item // VECTOR_BYTES, src.stride(1) * item // VECTOR_BYTES,
        dst.stride(0) * item // VECTOR_BYTES, dst.stride(1) * item // VECTOR_BYTES,
        positions.stride(0), slots.stride(0),
    )
    args = tuple(np.uint64(p) for p in pointers) + tuple(np.int64(s) for s in sizes)
    stream = torch.cuda.current_stream(dst.device).cuda_stream
    with cupy.cuda.Device(dst.device.index or 0), cupy.cuda.ExternalStream(stream):
        _kernel()((blocks, heads), (THREADS,), args)
