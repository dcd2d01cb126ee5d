"""Gathering selected (KV head, token) fragments from the host KV store into device slots.

One contract for every implementation::

    gather_fragments(src, positions, slots, dst, method)

- ``src``: ``[KvH, C, D]`` host tensor (one layer's K or V in the host store; pinned on CUDA
  machines). The last dimension must be contiguous.
- ``positions``: ``[KvH, m]`` long, on ``dst``'s device: the token of each fragment to read.
- ``slots``: ``[KvH, m]`` long, on ``dst``'s device: the slot of ``dst`` each fragment goes to.
- ``dst``: ``[KvH, S, D]`` on the compute device, same dtype as ``src``.

It copies ``src[h, positions[h, j]]`` into ``dst[h, slots[h, j]]`` for every ``h`` and ``j``.
There are no masks: callers route padding entries to a spare "trash" slot (several entries
writing the same slot leave it with one of them, unspecified which). On CUDA the copy is
issued on the current stream (the prefetcher sets its copy stream around the call).

Methods:

- ``index``: advanced indexing on the host, then one copy. The reference, and the only method
  on a machine without CUDA. On CUDA it synchronises (positions go to the host first).
- ``batched-copy``: the reference engine's approach on CUDA: ``index_select`` on the pinned
  host tensor into a pinned staging buffer, then one asynchronous host-to-device copy and a
  scatter into the slots. Synchronises once per call (positions go to the host).
- ``zero-copy``: a Triton kernel that reads the fragments straight out of mapped pinned host
  memory (UVA) into ``dst``: no staging, no host synchronisation, only the selected bytes cross
  the bus.
- ``zero-copy-cupy``: the same gather as a cupy raw CUDA kernel (one thread per 16-byte vector).

``default_gather_method`` picks the first zero-copy method that passes a one-time self-check
against ``index`` on the device, else ``batched-copy``; on CPU it is always ``index``.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import warnings

import torch

INDEX = "index"
BATCHED_COPY = "batched-copy"
ZERO_COPY = "zero-copy"
ZERO_COPY_CUPY = "zero-copy-cupy"
ALL_METHODS = (INDEX, BATCHED_COPY, ZERO_COPY, ZERO_COPY_CUPY)
VECTOR_BYTES = 16  # the zero-copy kernels move whole 16-byte vectors


def gather_fragments(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, method: str = INDEX
) -> None:
    """Copy ``src[h, positions[h, j]]`` to ``dst[h, slots[h, j]]`` for all ``h, j``.

    src ``[KvH, C, D]`` host; positions, slots ``[KvH, m]`` long on ``dst.device``;
    dst ``[KvH, S, D]`` (same dtype as src). ``method`` is one of ``ALL_METHODS``.
    """
    _check_shapes(src, positions, slots, dst)
    if positions.shape[1] == 0:
        return
    try:
        implementation = _IMPLEMENTATIONS[method]
    except KeyError:
        raise ValueError(f"unknown gather method {method!r}; choose one of {', '.join(ALL_METHODS)}") from None
    implementation(src, positions, slots, dst)


def _check_shapes(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor) -> None:
    if src.dim() != 3 or dst.dim() != 3:
        raise ValueError(f"src and dst must be [KvH, tokens, D]; got {tuple(src.shape)} and {tuple(dst.shape)}")
    heads = src.shape[0]
    if dst.shape[0] != heads or dst.shape[2] != src.shape[2] or dst.dtype != src.dtype:
        raise ValueError(
            f"dst {tuple(dst.shape)} {dst.dtype} does not match src {tuple(src.shape)} {src.dtype} "
            "in KV heads, head dim or dtype"
        )
    if positions.shape != slots.shape or positions.dim() != 2 or positions.shape[0] != heads:
        raise ValueError(
            f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must both be [KvH={heads}, m]"
        )
    if positions.dtype != torch.long or slots.dtype != torch.long:
        raise ValueError("positions and slots must be torch.long")
    if src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError("the head dim of src and dst must be contiguous (stride 1)")


# ----------------------------------------------------------------------------------------------
# index (reference, CPU)


def _gather_index(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor
) -> None:
    """Row selection on the host, one copy to the device, row copies into the slots.

    Per KV head ``index_select`` + ``index_copy_`` (whole ``D``-rows, memcpy-like) is 3x faster on
    the CPU than one advanced-indexing gather and scatter over ``[KvH, m]``.
    """
    positions = positions.to(src.device)
    slots = slots.to(dst.device)
    for head in range(src.shape[0]):
        rows = src[head].index_select(0, positions[head])  # [m, D]
        dst[head].index_copy_(0, slots[head], rows.to(dst.device))


# ----------------------------------------------------------------------------------------------
# batched-copy (CUDA): index_select into pinned staging, one async copy


class _PinnedStaging:
    """Reusable pinned buffers per (device, dtype), used in turn, each guarded by an event.

    The host must not overwrite a buffer while an asynchronous copy out of it may still be
    reading it, so each use waits for the event recorded after that buffer's last copy. With
    ``RING`` buffers in turn, filling the next one (say V's) overlaps the copy of the last (K's).
    """

    RING = 2

    def __init__(self) -> None:
        self._rings: dict[tuple[torch.device, torch.dtype], list] = {}
        self._turn: dict[tuple[torch.device, torch.dtype], int] = {}
        self._lock = threading.Lock()

    def take(self, device: torch.device, dtype: torch.dtype, rows: int, width: int):
        """A pinned ``[rows, width]`` view, safe to overwrite now, and the event to record after use."""
        key = (device, dtype)
        with self._lock:
            ring = self._rings.setdefault(key, [[None, None] for _ in range(self.RING)])
            turn = self._turn.get(key, 0)
            self._turn[key] = (turn + 1) % self.RING
            entry = ring[turn]
            if entry[1] is not None:
                entry[1].synchronize()  # the last copy out of this buffer has finished reading it
            if entry[0] is None or entry[0].numel() < rows * width:
                entry[0] = torch.empty(max(rows * width, 1 << 20), dtype=dtype, pin_memory=True)
                entry[1] = torch.cuda.Event()
            return entry[0][: rows * width].view(rows, width), entry[1]


_STAGING = _PinnedStaging()


def _gather_batched_copy(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor
) -> None:
    """index_select on the host into pinned staging, one non-blocking copy, scatter on device."""
    heads, capacity, width = src.shape
    m = positions.shape[1]
    # Host sync: index_select runs on the CPU and needs the positions there.
    rows = positions.cpu() + torch.arange(heads).unsqueeze(1) * capacity  # [KvH, m] rows of src
    staging, event = _STAGING.take(dst.device, src.dtype, heads * m, width)
    torch.index_select(src.reshape(heads * capacity, width), 0, rows.flatten(), out=staging)
    on_device = staging.to(dst.device, non_blocking=True).view(heads, m, width)
    event.record()  # on the current stream, after the copy that reads the staging buffer
    head_index = torch.arange(heads, device=dst.device).unsqueeze(1)
    dst[head_index, slots] = on_device


# ----------------------------------------------------------------------------------------------
# zero-copy (CUDA): kernels that read mapped pinned host memory directly


def _check_zero_copy(src: torch.Tensor, positions: torch.Tensor, dst: torch.Tensor) -> None:
    """The kernels read ``src`` over the bus and move 16-byte vectors: check both are legal."""
    if dst.device.type != "cuda":
        raise ValueError("the zero-copy gather writes to a CUDA tensor; use method 'index' on CPU")
    if positions.device != dst.device:
        raise ValueError(f"positions and slots must be on {dst.device} (the destination), not {positions.device}")
    if src.device.type != "cpu" or not src.is_pinned():
        # A pageable pointer would fault on the GPU and poison the CUDA context: refuse here.
        raise ValueError("the zero-copy gather reads pinned host memory; src is not pinned")
    row_bytes = src.shape[2] * src.element_size()
    for name, t in (("src", src), ("dst", dst)):
        strides_ok = all((s * t.element_size()) % VECTOR_BYTES == 0 for s in t.stride()[:2])
        if t.data_ptr() % VECTOR_BYTES or not strides_ok or row_bytes % VECTOR_BYTES:
            raise ValueError(
                f"the zero-copy gather moves 16-byte vectors: {name} rows of {row_bytes} bytes, "
                f"strides {t.stride()} and address must all be multiples of 16 bytes"
            )


def _gather_zero_copy_triton(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor
) -> None:
    _check_zero_copy(src, positions, dst)
    from . import gather_triton  # imports Triton: only reached on CUDA machines

    gather_triton.gather(src, positions.contiguous(), slots.contiguous(), dst)


def _gather_zero_copy_cupy(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor
) -> None:
    _check_zero_copy(src, positions, dst)
    from . import gather_cupy  # imports cupy: only reached on CUDA machines

    gather_cupy.gather(src, positions.contiguous(), slots.contiguous(), dst)


_IMPLEMENTATIONS = {
    INDEX: _gather_index,
    BATCHED_COPY: _gather_batched_copy,
    ZERO_COPY: _gather_zero_copy_triton,
    ZERO_COPY_CUPY: _gather_zero_copy_cupy,
}


# ----------------------------------------------------------------------------------------------
# Which methods this machine has


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_gather_methods(device: str | torch.device) -> list[str]:
    """The methods that can run for ``device`` here (libraries present; not yet run)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return [INDEX]
    methods = [INDEX, BATCHED_COPY]
    if _importable("triton"):
        methods.append(ZERO_COPY)
    if _importable("cupy"):
        methods.append(ZERO_COPY_CUPY)
    return methods


def default_gather_method(device: str | torch.device) -> str:
    """The fastest method expected to work: a zero-copy kernel that passed its self-check on
    ``device`` (checked once per process), else ``batched-copy``; ``index`` on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return INDEX
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for method in (ZERO_COPY, ZERO_COPY_CUPY):
        if method in available_gather_methods(device) and self_check(method, str(device)):
            return method
    return BATCHED_COPY


@functools.cache
def self_check(method: str, device: str) -> bool:
    """Run ``method`` once on a small pinned store and compare with ``index``; warn on failure.

    Guards the default: an untested or miscompiled kernel never becomes the default silently.
    """
    try:
        generator = torch.Generator().manual_seed(0)
        src = torch.randn(2, 37, 64, generator=generator).to(torch.bfloat16).pin_memory()  # [KvH, C, D]
        positions = torch.tensor([[36, 0, 5], [1, 36, 36]], device=device)  # last token, repeats
        slots = torch.tensor([[2, 0, 1], [0, 1, 2]], device=device)
        expected = torch.zeros(2, 4, 64, dtype=src.dtype, device=device)
        got = torch.zeros_like(expected)
        gather_fragments(src, positions, slots, expected, INDEX)
        gather_fragments(src, positions, slots, got, method)
        torch.cuda.synchronize(device)  # the check reads the result on the host
        ok = torch.equal(expected.cpu(), got.cpu())
        reason = "" if ok else "wrong values"
    except Exception as exc:  # compile or launch failure: fall back, but say so
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        warnings.warn(f"gather method {method!r} failed its self-check on {device} ({reason}); not using it",
                      stacklevel=2)
    return ok
