"""The host KV store: the full K and V of every layer, in host memory.

Storage per layer is token-major, ``[capacity, KvH, D]`` for K and for V, seen by gathers as
``keys[l]`` / ``values[l]`` ``[KvH, capacity, D]`` (a view). One (KV head, token) fragment of
``D`` elements is contiguous, and so is every transfer the offload path makes: a token's K/V
written back (``[1, KvH, D]``), a prompt chunk, and dense offload's prefix ``[:end]``. A copy
through a non-contiguous view of pinned memory is staged by PyTorch through pageable memory and
synchronises; these never are.

Memory is preallocated for the whole context in a few large page-aligned buffers of exact size
(anonymous ``mmap``), after checking with psutil that they fit. On a CUDA machine each buffer
is page-locked with ``cudaHostRegister`` (cupy's runtime when importable, else torch's), mapped
for zero-copy kernels: the pinned footprint is exactly what the check counted, no allocation
exceeds ``BUFFER_BYTES`` unless one layer's K alone does, and ``close()`` unregisters them all.
(``cudaHostAlloc`` through torch's caching allocator rounds each block up to a power of two, and
other offload engines report single pinned allocations above ~4 GB failing.)
"""

from __future__ import annotations

import math
import mmap
import weakref
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from ..errors import InsufficientMemoryError, TbrunError
from ..models import ModelDims

# Room left for the rest of the process (model copy on host, activations, the OS).
HOST_HEADROOM_BYTES = 512 * 1024**2
PAGE_BYTES = mmap.PAGESIZE
BUFFER_BYTES = 8 * 2**30  # the most one registered buffer holds (unless one tensor is larger)
TENSOR_ALIGN = 256  # tensors start at multiples of this inside a buffer (16-byte vector loads)
# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every context, with a device
# address (equal to the host address under UVA) for the zero-copy kernels.
REGISTER_FLAGS = 1 | 2


class PinnedMemoryError(TbrunError):
    """The driver refused to page-lock the host KV store."""


def host_store_bytes(dims: ModelDims, capacity: int, dtype: torch.dtype, layers: int | None = None) -> int:
    """Bytes of K and V for ``capacity`` tokens over ``layers`` layers (default: all) and all KV heads."""
    stored = dims.num_layers if layers is None else layers
    return dims.kv_bytes_per_token(dtype) // dims.num_layers * stored * capacity


def check_host_memory(needed: int, what: str = "the host KV store") -> None:
    """Refuse, before allocating, when ``needed`` bytes do not fit in available host memory."""
    available = psutil.virtual_memory().available
    if needed + HOST_HEADROOM_BYTES > available:
        raise InsufficientMemoryError(
            f"{what} needs {needed / 2**30:.2f} GiB of host memory but only "
            f"{available / 2**30:.2f} GiB is available (keeping {HOST_HEADROOM_BYTES / 2**30:.1f} GiB "
            "spare): lower --context, or free host memory."
        )


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """Where each of the ``tensors`` equal tensors (K0, V0, K1, V1, ...) lives: ``per_buffer`` of
    them back to back (at ``slot_bytes`` strides) in each page-aligned buffer."""

    tensor_bytes: int
    tensors: int
    per_buffer: int

    @property
    def slot_bytes(self) -> int:
        return _round_up(self.tensor_bytes, TENSOR_ALIGN)

    @property
    def buffers(self) -> int:
        return math.ceil(self.tensors / self.per_buffer)

    def buffer_bytes(self, buffer: int) -> int:
        """Exact size of ``buffer``: its tensors, rounded up to whole pages."""
        held = min(self.per_buffer, self.tensors - buffer * self.per_buffer)
        return _round_up(held * self.slot_bytes, PAGE_BYTES)

    @property
    def footprint(self) -> int:
        """Host bytes the store takes (pinned on CUDA): what the admission check counts."""
        return sum(self.buffer_bytes(b) for b in range(self.buffers))

    def place(self, tensor: int) -> tuple[int, int]:
        """(buffer, byte offset) of tensor number ``tensor``."""
        return tensor // self.per_buffer, (tensor % self.per_buffer) * self.slot_bytes


def store_layout(dims: ModelDims, capacity: int, dtype: torch.dtype, buffer_bytes: int | None = None,
                 stored_layers: int | None = None) -> StoreLayout:
    """The buffers of a store of ``capacity`` tokens for ``stored_layers`` layers (default: all;
    sliding-window layers are not stored): as few as fit under ``buffer_bytes`` (default
    ``BUFFER_BYTES``) each."""
    buffer_bytes = BUFFER_BYTES if buffer_bytes is None else buffer_bytes
    itemsize = torch.empty((), dtype=dtype).element_size()
    tensor_bytes = capacity * dims.num_kv_heads * dims.head_dim * itemsize
    tensors = 2 * (dims.num_layers if stored_layers is None else stored_layers)
    per_buffer = max(1, buffer_bytes // _round_up(tensor_bytes, TENSOR_ALIGN))
    return StoreLayout(tensor_bytes, tensors, max(1, min(per_buffer, tensors)))


# ----------------------------------------------------------------------------------------------
# Page-locking: cudaHostRegister through cupy's runtime, else torch's


class HostRegistrar:
    """``register(address, nbytes)`` / ``unregister(address)`` with the CUDA driver."""

    def __init__(self) -> None:
        try:
            from cupy.cuda import runtime

            runtime.getDeviceCount()  # a cupy without a usable CUDA runtime raises here
            self._register, self._unregister, self.via = self._cupy(runtime)
        except Exception:
            self._register, self._unregister, self.via = self._torch()

    @staticmethod
    def _cupy(runtime):
        return (lambda a, n: runtime.hostRegister(a, n, REGISTER_FLAGS)), runtime.hostUnregister, "cupy"

    @staticmethod
    def _torch():
        cudart = torch.cuda.cudart()

        def register(address: int, nbytes: int) -> None:
            status = int(cudart.cudaHostRegister(address, nbytes, REGISTER_FLAGS))
            if status:
                raise RuntimeError(f"cudaHostRegister returned error {status}")

        return register, lambda address: int(cudart.cudaHostUnregister(address)), "torch"

    def register(self, address: int, nbytes: int) -> None:
        self._register(address, nbytes)

    def unregister(self, address: int) -> None:
        self._unregister(address)


class _Mapping:
    """An anonymous page-aligned, zero-filled mapping of ``nbytes``, handed to numpy (and so to torch)
    through ``__array_interface__``: every tensor over it keeps this object alive through its storage,
    so a finalizer attached here runs only once the last view is gone, and before the mapping is
    unmapped (an object's weak-reference callbacks run before its attributes are released).

    Private, not ``mmap``'s default shared mapping: Linux gives transparent huge pages to private anonymous
    memory that asks for them (``transparent_hugepage/enabled`` ``madvise``, the common default), while shared
    anonymous memory is shmem, which takes them only under ``shmem_enabled`` (``never`` by default). Until
    stop 57 the mapping was shared and so asked for huge pages in vain."""

    def __init__(self, nbytes: int):
        self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            self.map.madvise(mmap.MADV_HUGEPAGE)  # fewer pages to fault in, map, lock, and miss in the TLB
        self.address = np.frombuffer(self.map, dtype=np.uint8).ctypes.data  # the export ends with the array
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (self.address, False),
                                    "version": 3}


class HostBuffer:
    """One page-aligned host allocation of exactly ``nbytes`` (whole pages), page-locked when
    ``registrar`` is given. Freed when this object and the last tensor viewing it are gone; unpinned
    then, or by ``close()`` if that comes first (a view that outlives this object, e.g. a transpose
    of ``allocate_host``'s tensor, keeps the memory pinned)."""

    def __init__(self, nbytes: int, registrar: HostRegistrar | None = None):
        self.nbytes = _round_up(max(nbytes, 1), PAGE_BYTES)
        memory = _Mapping(self.nbytes)
        self.bytes = torch.from_numpy(np.asarray(memory))  # its storage holds the mapping
        self.address = memory.address
        self._release = None
        if registrar is not None:
            try:
                registrar.register(self.address, self.nbytes)
            except Exception as exc:
                raise PinnedMemoryError(
                    f"could not page-lock {self.nbytes / 2**30:.2f} GiB of host memory ({exc}); "
                    "check the locked-memory limit (ulimit -l) and free host memory, or lower --context."
                ) from exc
            self._release = weakref.finalize(memory, registrar.unregister, self.address)

    @property
    def pinned(self) -> bool:
        return self._release is not None and self._release.alive

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` over bytes ``[offset, offset + its size)``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        size = math.prod(shape) * itemsize
        if offset + size > self.nbytes:
            raise ValueError(f"{size} bytes at offset {offset} overrun a buffer of {self.nbytes}")
        return self.bytes[offset: offset + size].view(dtype).view(shape)

    def close(self) -> None:
        """Unregister now (the memory itself goes with its last view)."""
        if self._release is not None:
            self._release()


def allocate_host(shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                  registrar: HostRegistrar | None = None) -> torch.Tensor:
    """A zeroed host tensor in its own buffer, page-locked when ``pin`` (by ``registrar``, default
    ``HostRegistrar()``); unpinned when the tensor and every view of it are collected."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = HostBuffer(math.prod(shape) * itemsize, (registrar or HostRegistrar()) if pin else None)
    return buffer.view(0, shape, dtype)


class HostKVStore:
    """Owns the host copy of the KV cache. Tokens are written once and never move.

    ``keys[l]`` and ``values[l]``: ``[KvH, capacity, D]`` views (gather sources) of the token-major
    ``token_keys[l]`` / ``token_values[l]`` ``[capacity, KvH, D]``, in the model dtype, for every
    stored layer; ``layers`` (default: all) leaves out sliding-window layers, whose tensors are then
    empty (``capacity`` 0: they keep their window on the device and never come here).
    """

    def __init__(self, dims: ModelDims, capacity: int, dtype: torch.dtype, pin: bool | None = None,
                 registrar: HostRegistrar | None = None, layers: list[int] | None = None):
        if pin is None:
            pin = torch.cuda.is_available()
        self.layers = list(range(dims.num_layers)) if layers is None else list(layers)
        self.layout = store_layout(dims, capacity, dtype, stored_layers=len(self.layers))
        check_host_memory(self.layout.footprint)
        self.dims, self.capacity, self.dtype, self.pinned = dims, capacity, dtype, pin
        if pin and registrar is None:
            registrar = HostRegistrar()
        self.buffers = [allocate_buffer(self.layout.buffer_bytes(b), registrar if pin else None)
                        for b in range(self.layout.buffers)]
        shape = (capacity, dims.num_kv_heads, dims.head_dim)
        tensors = [self.buffers[b].view(offset, shape, dtype) for b, offset in
                   map(self.layout.place, range(self.layout.tensors))]
        empty = torch.empty(0, dims.num_kv_heads, dims.head_dim, dtype=dtype)
        index = {layer: i for i, layer in enumerate(self.layers)}
        self.token_keys = [tensors[2 * index[l]] if l in index else empty for l in range(dims.num_layers)]
        self.token_values = [tensors[2 * index[l] + 1] if l in index else empty for l in range(dims.num_layers)]
        self.keys = [t.transpose(0, 1) for t in self.token_keys]
        self.values = [t.transpose(0, 1) for t in self.token_values]
        self.length = 0  # tokens written to every layer

    @property
    def nbytes(self) -> int:
        return host_store_bytes(self.dims, self.capacity, self.dtype, len(self.layers))

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, non_blocking: bool = False) -> None:
        """Write k, v ``[KvH, T, D]`` (any device) at positions ``start .. start+T-1`` of ``layer``.

        Each copy lands in one contiguous range (``[T, KvH, D]``): the source is made token-major
        on its own device first, so a device-to-host copy is a single DMA into pinned memory.
        """
        end = start + k.shape[1]
        if end > self.capacity:
            raise IndexError(f"position {end - 1} is past the store's capacity of {self.capacity}")
        for store, source in ((self.token_keys[layer], k), (self.token_values[layer], v)):
            source = source.transpose(0, 1)  # [T, KvH, D]
            if source.device.type != "cpu":
                source = source.contiguous()  # on the device, on the current (write-back) stream
            store[start:end].copy_(source, non_blocking=non_blocking)

    def close(self) -> None:
        """Unpin and release the memory now (pinned memory is scarce; do not wait for the collector)."""
        for buffer in self.buffers:
            buffer.close()
        self.buffers, self.keys, self.values, self.token_keys, self.token_values = [], [], [], [], []

    @property
    def closed(self) -> bool:
        return not self.keys


def allocate_buffer(nbytes: int, registrar: HostRegistrar | None) -> HostBuffer:
    """One store buffer (the seam tests use to count allocations)."""
    return HostBuffer(nbytes, registrar)
