"""Gathering selected (KV head, token) fragments from the host KV store into device slots.

One contract for every implementation::

    gather_fragments(src, positions, slots, dst, method, counts=None)

- ``src``: ``[KvH, C, D]`` host tensor (one layer's K or V in the host store, a token-major
  view there; pinned on CUDA machines). The last dimension must be contiguous.
- ``positions``: ``[KvH, m]`` long, on ``dst``'s device: the token of each fragment to read.
- ``slots``: ``[KvH, m]`` long, on ``dst``'s device: the slot of ``dst`` each fragment goes to.
- ``dst``: ``[KvH, S, D]`` on the compute device, same dtype as ``src``.
- ``counts``: ``[KvH]`` long on ``dst``'s device, or None: the real entries of each head are
  ``j < counts[h]``; the rest is padding and moves no bytes (masked on the device, no sync).

It copies ``src[h, positions[h, j]]`` into ``dst[h, slots[h, j]]`` for every ``h`` and real
``j``. Padding entries point at a spare "trash" slot, so a caller without counts may let them
be copied there (several entries writing one slot leave it with one of them, unspecified
which). On CUDA the copy is issued on the current stream (the prefetcher sets its copy stream
around the call), and every tensor it reads must stay alive until that stream has run it
(``Prefetcher.issue(..., keep_alive=...)``).

Methods:

- ``index``: advanced indexing on the host, then one copy. The reference, and the only method
  on a machine without CUDA. On CUDA it synchronises (positions go to the host first). With host
  and working set both in CPU memory, one native call per layer copies K and V where
  ``offload_engine.native`` is built (else ``index_select`` + ``index_copy_``).
- ``batched-copy``: the reference engine's approach on CUDA: ``index_select`` on the pinned
  host tensor into a pinned staging buffer, then one asynchronous host-to-device copy and a
  scatter into the slots. The CPU does the indexing, so it needs the positions on the host:
  one device-to-host copy of positions and counts, and the host waits for the current (copy)
  stream to deliver them. That wait is inherent to the method; the zero-copy kernels have none.
- ``zero-copy``: a Triton kernel that reads the fragments straight out of mapped pinned host
  memory (UVA) into ``dst``: no staging, no host synchronisation, only the selected bytes cross
  the bus.
- ``zero-copy-cupy``: the same gather as a cupy raw CUDA kernel (one thread per 16-byte vector).

``choose_gather_method`` picks the first zero-copy method that passes a one-time self-check
against ``index`` on the device, else ``batched-copy``; on CPU it is always ``index``. It says
why, for ``tbrun info``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sysconfig
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from .. import native

INDEX = "index"
BATCHED_COPY = "batched-copy"
ZERO_COPY = "zero-copy"
ZERO_COPY_CUPY = "zero-copy-cupy"
ALL_METHODS = (INDEX, BATCHED_COPY, ZERO_COPY, ZERO_COPY_CUPY)
VECTOR_BYTES = 16  # the zero-copy kernels move whole 16-byte vectors


def gather_fragments(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, method: str = INDEX,
    counts: torch.Tensor | None = None,
) -> None:
    """Copy ``src[h, positions[h, j]]`` to ``dst[h, slots[h, j]]`` for all ``h`` and ``j < counts[h]``.

    src ``[KvH, C, D]`` host; positions, slots ``[KvH, m]`` long on ``dst.device``; dst
    ``[KvH, S, D]`` (same dtype as src); counts ``[KvH]`` long on ``dst.device`` or None (all
    ``m`` entries real). ``method`` is one of ``ALL_METHODS``.
    """
    gather_pairs(((src, dst),), positions, slots, method, counts)


def _check_shapes(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor,
                  counts: torch.Tensor | None) -> None:
    _check_tables(src, dst)
    _check_plan(src.shape[0], positions, slots, counts)


def _check_tables(src: torch.Tensor, dst: torch.Tensor) -> None:
    """A host store ``[KvH, tokens, D]`` and its slots ``[KvH, slots, D]``: the same heads, head dim and dtype,
    the head dim contiguous."""
    if src.dim() != 3 or dst.dim() != 3:
        raise ValueError(f"src and dst must be [KvH, tokens, D]; got {tuple(src.shape)} and {tuple(dst.shape)}")
    if dst.shape[0] != src.shape[0] or dst.shape[2] != src.shape[2] or dst.dtype != src.dtype:
        raise ValueError(
            f"dst {tuple(dst.shape)} {dst.dtype} does not match src {tuple(src.shape)} {src.dtype} "
            "in KV heads, head dim or dtype"
        )
    if src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError("the head dim of src and dst must be contiguous (stride 1)")


def _check_plan(heads: int, positions: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor | None) -> None:
    """A plan of ``heads`` rows: positions and slots ``[KvH, m]`` long, counts ``[KvH]`` long beside them."""
    if positions.shape != slots.shape or positions.dim() != 2 or positions.shape[0] != heads:
        raise ValueError(
            f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must both be [KvH={heads}, m]"
        )
    if positions.dtype != torch.long or slots.dtype != torch.long:
        raise ValueError("positions and slots must be torch.long")
    if counts is not None and (counts.shape != (heads,) or counts.dtype != torch.long
                               or counts.device != positions.device):
        raise ValueError(f"counts must be [KvH={heads}] long on {positions.device}; got "
                         f"{tuple(counts.shape)} {counts.dtype} on {counts.device}")


def real_entries(m: int, counts: torch.Tensor | None, heads: int) -> torch.Tensor:
    """``[KvH, m]`` bool: entry ``j`` of head ``h`` is real (``j < counts[h]``), on counts' device."""
    if counts is None:
        return torch.ones(heads, m, dtype=torch.bool)
    return torch.arange(m, device=counts.device) < counts.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# index (reference, CPU)


def _gather_index(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, counts: torch.Tensor | None
) -> None:
    """Row selection on the host, one copy to the device, row copies into the slots; only the real
    fragments of each head (``counts``) move.

    On the CPU every head moves at once: ``src`` and ``dst`` are seen as flat tables of ``D``-rows
    (``row_table``), so one ``index_select`` and one ``index_copy_`` serve all heads. Elsewhere (or a
    layout without such a table), per KV head ``index_select`` + ``index_copy_`` (whole ``D``-rows,
    memcpy-like), 3x faster than one advanced-indexing gather and scatter over ``[KvH, m]``. On
    CUDA the counts are read back (a sync): this is the reference method there, not the fast one.
    """
    heads, m = positions.shape
    if src.device.type == dst.device.type == "cpu":
        from_rows, to_rows = row_table(src), row_table(dst)
        if from_rows is not None and to_rows is not None:
            _gather_rows(from_rows, to_rows, positions, slots, counts)
            return
    positions, slots = positions.to(src.device), slots.to(dst.device)
    real = [m] * heads if counts is None else counts.tolist()
    for head, n in enumerate(real):
        if n:
            rows = src[head].index_select(0, positions[head, :n])  # [n, D]
            dst[head].index_copy_(0, slots[head, :n], rows.to(dst.device))


class RowTable(NamedTuple):
    """``[H, N, D]`` seen as one table of rows: entry ``(h, j)`` is ``rows[h * head_step + j * row_step]``."""

    rows: torch.Tensor  # [R, D]
    head_step: int
    row_step: int

    def index(self, entries: torch.Tensor) -> torch.Tensor:
        """entries ``[H, m]`` (row ``j`` of head ``h``) -> row numbers ``[H, m]``."""
        heads = torch.arange(entries.shape[0], device=entries.device).unsqueeze(-1)
        return entries * self.row_step + heads * self.head_step


def row_table(t: torch.Tensor) -> RowTable | None:
    """``t`` ``[H, N, D]`` (any strides that keep whole ``D``-rows: contiguous rows, head and row
    strides multiples of ``D``, like the token-major host store or a slice of a bank) as a flat table
    of rows over the same memory; None when the layout has no such table."""
    width = t.shape[-1]
    if t.stride(-1) != 1 or t.stride(0) % width or t.stride(1) % width or t.numel() == 0 \
            or min(t.stride(0), t.stride(1)) <= 0:  # expanded (overlapping) rows are no table
        return None
    head_step, row_step = t.stride(0) // width, t.stride(1) // width
    count = (t.shape[0] - 1) * head_step + (t.shape[1] - 1) * row_step + 1
    return RowTable(t.as_strided((count, width), (width, 1), t.storage_offset()), head_step, row_step)


def _gather_rows(src: RowTable, dst: RowTable, positions: torch.Tensor, slots: torch.Tensor,
                 counts: torch.Tensor | None) -> None:
    """Every head's fragments in one ``index_select`` and one ``index_copy_`` (CPU), as 16-byte rows
    when both tables can be seen so."""
    _copy_rows(src, dst, *_row_numbers(src, dst, positions, slots, counts))


def _row_numbers(src: RowTable, dst: RowTable, positions: torch.Tensor, slots: torch.Tensor,
                 counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the real fragments read in ``src`` and write in ``dst``: two ``[n]`` long tensors."""
    sources, targets = src.index(positions), dst.index(slots)  # [H, m]
    if counts is None:
        return sources.flatten(), targets.flatten()
    real = torch.arange(positions.shape[1]) < counts.unsqueeze(-1)
    return sources[real], targets[real]


def _copy_rows(src: RowTable, dst: RowTable, sources: torch.Tensor, targets: torch.Tensor) -> None:
    """``dst.rows[targets] = src.rows[sources]``, as 16-byte rows when both tables can be seen so."""
    from_rows, to_rows = as_wide_rows(src.rows), as_wide_rows(dst.rows)
    if from_rows.dtype != to_rows.dtype:
        from_rows, to_rows = src.rows, dst.rows
    to_rows.index_copy_(0, targets, from_rows.index_select(0, sources))


def gather_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, slots: torch.Tensor,
                 method: str = INDEX, counts: torch.Tensor | None = None) -> None:
    """``gather_fragments(src, positions, slots, dst, method, counts)`` for every ``(src, dst)`` of
    ``pairs`` (a layer's keys and values): one plan, several tensors of one layout.

    Every pair is checked before any is copied. On the CPU (``index``) the row numbers are computed
    once for all pairs when their tables share one layout; otherwise each pair is gathered on its own
    (``gather_fragments`` is this with one pair).
    """
    try:
        implementation = _IMPLEMENTATIONS[method]
    except KeyError:
        raise ValueError(f"unknown gather method {method!r}; choose one of {', '.join(ALL_METHODS)}") from None
    for src, dst in pairs:  # every pair refused before any is copied
        _check_shapes(src, positions, slots, dst, counts)
    if positions.shape[1] == 0:
        return
    on_cpu = all(s.device.type == d.device.type == "cpu" for s, d in pairs)
    kernels = native.kernels() if method == INDEX and on_cpu else None
    if kernels is not None and kernels.gather_pairs(pairs, positions, slots, counts):
        return
    if method == INDEX and len(pairs) > 1 and on_cpu:
        tables = [(row_table(s), row_table(d)) for s, d in pairs]
        layout = [(t.head_step, t.row_step) if t is not None else None for pair in tables for t in pair]
        if None not in layout and len(set(layout[0::2])) == 1 and len(set(layout[1::2])) == 1:
            sources, targets = _row_numbers(*tables[0], positions, slots, counts)
            for from_rows, to_rows in tables:
                _copy_rows(from_rows, to_rows, sources, targets)
            return
    for src, dst in pairs:
        implementation(src, positions, slots, dst, counts)


WIDE_ELEMENT = torch.complex128  # 16 bytes: a row of D values moved as D * itemsize / 16 elements


def pairs_gatherer(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], method: str = INDEX
                   ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]:
    """``gather_pairs`` of these pairs (a layer's host K/V and its slots), for every plan to come:
    ``gather(positions, slots, counts)``. On the CPU with the native kernels the tables' layout is checked
    once here and each call makes one kernel call (the ~20 checks and conversions of ``gather_pairs`` at
    every layer and step cost as much as small plans' copies); elsewhere each call is ``gather_pairs``."""
    pairs = tuple(pairs)
    on_cpu = all(s.device.type == d.device.type == "cpu" for s, d in pairs)
    kernels = native.kernels() if method == INDEX and on_cpu else None
    for src, dst in pairs:  # the tables' part of gather_pairs' checks, now
        _check_tables(src, dst)
    bound = kernels.bind_gather_pairs(pairs) if kernels is not None else None
    if bound is not None:
        return bound
    return lambda positions, slots, counts=None: gather_pairs(pairs, positions, slots, method, counts)


def as_wide_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[..., D]`` viewed with 16-byte elements along its last dimension, when its layout
    allows (rows of a multiple of 16 bytes, strides and offset to match); else ``t`` itself.

    The same bytes: only how row copies count them changes. CPU ``index_select``/``index_copy_``
    cost per element as well as per byte: with every head at once, one layer's gather takes
    0.59-0.75x the per-head time in bfloat16 and 0.89-0.98x in float32 (bench/reports/gather_cpu.md).
    """
    width = WIDE_ELEMENT.itemsize
    if t.shape[-1] * t.element_size() % width:
        return t
    try:
        return t.view(WIDE_ELEMENT)
    except RuntimeError:  # a stride or the storage offset is not a multiple of 16 bytes
        return t


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


def token_rows(src: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``src [KvH, C, D]`` as rows of its storage: ``(rows [R, D], head_step, token_step)`` with
    fragment ``(h, p)`` at row ``h * head_step + p * token_step``. No copy (a view)."""
    heads, capacity, width = src.shape
    if src.stride(0) % width or src.stride(1) % width:
        raise ValueError(f"src strides {src.stride()} are not whole rows of {width}: cannot index rows")
    head_step, token_step = src.stride(0) // width, src.stride(1) // width
    count = (heads - 1) * head_step + (capacity - 1) * token_step + 1
    return src.as_strided((count, width), (width, 1)), head_step, token_step


def _to_host(positions: torch.Tensor, counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[KvH, m]`` and counts ``[KvH]`` on the host, in one device-to-host copy.

    Host wait: the CPU indexes the store, so it needs them. It waits for the current (copy)
    stream only, which runs after the compute work that made the plan.
    """
    heads, m = positions.shape
    counts = torch.full((heads,), m, device=positions.device) if counts is None else counts
    packed = torch.cat([positions, counts.unsqueeze(1)], dim=1).to("cpu", non_blocking=True)  # pinned
    arrived = torch.cuda.Event()
    arrived.record()
    arrived.synchronize()
    return packed[:, :m], packed[:, m]


def pick_on_host(src: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``src`` that the real entries read, and where each goes.

    src ``[KvH, C, D]``; positions ``[KvH, m]``, counts ``[KvH]``, both on the host ->
    ``(rows [n], flat [n])``: entry ``flat = h * m + j`` reads storage row ``rows`` of
    ``token_rows(src)``, for the ``n = sum(counts)`` real entries only.
    """
    heads, m = positions.shape
    real = real_entries(m, counts, heads)  # [KvH, m]
    flat = torch.arange(heads * m).view(heads, m)[real]  # [n], in h * m + j order
    _, head_step, token_step = token_rows(src)
    return (flat // m) * head_step + positions[real] * token_step, flat


def _gather_batched_copy(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, counts: torch.Tensor | None
) -> None:
    """index_select of the real fragments on the host into pinned staging, one non-blocking copy,
    a scatter on the device. Only real fragments cross the bus."""
    m = positions.shape[1]
    rows, flat = pick_on_host(src, *_to_host(positions, counts))
    if flat.numel() == 0:
        return
    staging, staged = _STAGING.take(dst.device, src.dtype, flat.numel(), src.shape[2])
    torch.index_select(token_rows(src)[0], 0, rows, out=staging)
    indices, indexed = _STAGING.take(dst.device, torch.long, 1, flat.numel())
    indices[0].copy_(flat)
    on_device = staging.to(dst.device, non_blocking=True)  # [n, D]
    staged.record()  # on the current stream, after the copy that reads the staging buffer
    flat_device = indices[0].to(dst.device, non_blocking=True)  # [n]
    indexed.record()
    dst[flat_device // m, slots.flatten()[flat_device]] = on_device


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
    check_vector_alignment(src, dst)


def check_vector_alignment(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Rows, strides and addresses of ``src`` and ``dst`` must be whole 16-byte vectors."""
    row_bytes = src.shape[2] * src.element_size()
    for name, t in (("src", src), ("dst", dst)):
        strides_ok = all((s * t.element_size()) % VECTOR_BYTES == 0 for s in t.stride()[:2])
        if t.data_ptr() % VECTOR_BYTES or not strides_ok or row_bytes % VECTOR_BYTES:
            raise ValueError(
                f"the zero-copy gather moves 16-byte vectors: {name} rows of {row_bytes} bytes, "
                f"strides {t.stride()} and address must all be multiples of 16 bytes"
            )


def _gather_zero_copy_triton(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, counts: torch.Tensor | None
) -> None:
    _check_zero_copy(src, positions, dst)
    from . import gather_triton  # imports Triton: only reached on CUDA machines

    gather_triton.gather(src, positions.contiguous(), slots.contiguous(), dst, counts)


def _gather_zero_copy_cupy(
    src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor, counts: torch.Tensor | None
) -> None:
    _check_zero_copy(src, positions, dst)
    from . import gather_cupy  # imports cupy: only reached on CUDA machines

    gather_cupy.gather(src, positions.contiguous(), slots.contiguous(), dst,
                       None if counts is None else counts.contiguous())


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


def triton_problem() -> str | None:
    """Why Triton's gather cannot be built here, or None when its prerequisites are present.

    Triton compiles a small C launcher with the system C compiler at its first launch, against
    the Python headers; without either, the first launch fails.
    """
    if not _importable("triton"):
        return "Triton is not installed (pip install triton)"
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return "no C compiler (Triton builds its launcher with one at first launch: install gcc, or set CC)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers ({headers} is missing: install the python3-dev package of this Python)"
    return None


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


def choose_gather_method(device: str | torch.device) -> tuple[str, str]:
    """The method a run on ``device`` uses, and why: the first zero-copy kernel that passes its
    self-check (once per process), else ``batched-copy``; ``index`` without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return INDEX, "no CUDA device: the host store and the compute share one memory"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    skipped = []
    for method, library in ((ZERO_COPY, "triton"), (ZERO_COPY_CUPY, "cupy")):
        problem = triton_problem() if method == ZERO_COPY else (None if _importable("cupy") else
                                                                "cupy is not installed")
        problem = problem or self_check_failure(method, str(device))
        if problem is None:
            return method, f"the {library} kernel passed its self-check on {device}"
        skipped.append(f"{method}: {problem}")
    return BATCHED_COPY, "no zero-copy kernel works here (" + "; ".join(skipped) + ")"


def default_gather_method(device: str | torch.device) -> str:
    """The fastest method expected to work on ``device`` (see ``choose_gather_method``)."""
    return choose_gather_method(device)[0]


def self_check(method: str, device: str) -> bool:
    """Whether ``method`` passed its self-check on ``device`` (see ``self_check_failure``)."""
    return self_check_failure(method, device) is None


WRONG_VALUES = "wrong values"  # the self-check ran and disagreed with index: a bug, not a missing library


@functools.cache
def self_check_failure(method: str, device: str) -> str | None:
    """Run ``method`` once on a small pinned store and compare with ``index``: None when it
    agrees, else why not (and a warning).

    Guards the default: an untested or miscompiled kernel never becomes the default silently.
    """
    try:
        generator = torch.Generator().manual_seed(0)
        # Token-major [C, KvH, D] storage seen as [KvH, C, D], like the host store.
        src = torch.randn(37, 2, 64, generator=generator).to(torch.bfloat16).pin_memory().transpose(0, 1)
        positions = torch.tensor([[36, 0, 5, 0], [1, 36, 36, 0]], device=device)  # last token, repeats
        slots = torch.tensor([[2, 0, 1, 4], [0, 1, 2, 4]], device=device)  # padding into the trash slot 4
        counts = torch.tensor([3, 3], device=device)
        expected = torch.full((2, 5, 64), 7.0, dtype=src.dtype, device=device)
        got = expected.clone()
        gather_fragments(src, positions, slots, expected, INDEX, counts)
        gather_fragments(src, positions, slots, got, method, counts)
        torch.cuda.synchronize(device)  # the check reads the result on the host
        # The trash slot too: padding entries must not be copied.
        reason = None if torch.equal(expected.cpu(), got.cpu()) else WRONG_VALUES
    except Exception as exc:  # compile or launch failure: fall back, but say so
        reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        warnings.warn(f"gather method {method!r} failed its self-check on {device} ({reason}); not using it",
                      stacklevel=2)
    return reason
