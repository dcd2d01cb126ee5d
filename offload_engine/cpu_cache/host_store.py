"""The host KV store: the full K and V of every layer, in host memory.

Layout per layer: ``[KvH, capacity, D]`` for K and for V, so one (KV head, token) fragment of
``D`` elements is contiguous and a gather reads whole fragments. Memory is preallocated for the
whole context, after checking (with psutil) that it fits. On a CUDA machine it is page-locked
(pinned) so copies to the device run asynchronously at bus speed: through cupy when a CUDA cupy
is importable, else torch's pinned allocator. On a machine without CUDA it is ordinary memory.
"""

from __future__ import annotations

import psutil
import torch

from ..errors import InsufficientMemoryError
from ..models import ModelDims

# Room left for the rest of the process (model copy on host, activations, the OS).
HOST_HEADROOM_BYTES = 512 * 1024**2


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


def _cupy_pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A torch tensor over cupy pinned memory, or None when no CUDA cupy is importable."""
    try:
        import cupyx  # noqa: F401
        import cupy
    except Exception:  # cupy missing or without a usable CUDA runtime
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for size in shape:
        count *= size
    try:
        array = cupy.cuda.alloc_pinned_memory(count * itemsize)
    except Exception:
        return None
    raw = torch.frombuffer(array, dtype=torch.uint8, count=count * itemsize)
    tensor = raw.view(dtype).view(shape)
    tensor._tbrun_pinned_owner = array  # keep the allocation alive as long as the view
    return tensor


def allocate_host(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Zeroed host memory, pinned when ``pin`` (cupy first, then torch's allocator)."""
    if pin and all(shape):  # nothing to pin for an empty (not stored) layer
        tensor = _cupy_pinned(shape, dtype)
        if tensor is not None:
            return tensor.zero_()
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    return torch.zeros(shape, dtype=dtype)


class HostKVStore:
    """Owns the host copy of the KV cache. Tokens are written once and never move.

    ``keys[l]`` and ``values[l]``: ``[KvH, capacity, D]`` in the model dtype for every stored
    layer; ``layers`` (default: all) leaves out sliding-window layers, whose ``keys[l]`` are then
    ``[KvH, 0, D]`` (they keep their window on the device and never come here).
    """

    def __init__(self, dims: ModelDims, capacity: int, dtype: torch.dtype, pin: bool | None = None,
                 layers: list[int] | None = None):
        if pin is None:
            pin = torch.cuda.is_available()
        self.layers = list(range(dims.num_layers)) if layers is None else list(layers)
        check_host_memory(host_store_bytes(dims, capacity, dtype, len(self.layers)))
        self.dims = dims
        self.capacity = capacity
        self.dtype = dtype
        self.pinned = pin
        stored = set(self.layers)
        shapes = [(dims.num_kv_heads, capacity if layer in stored else 0, dims.head_dim)
                  for layer in range(dims.num_layers)]
        self.keys = [allocate_host(shape, dtype, pin) for shape in shapes]
        self.values = [allocate_host(shape, dtype, pin) for shape in shapes]
        self.length = 0  # tokens written to every layer

    @property
    def nbytes(self) -> int:
        return host_store_bytes(self.dims, self.capacity, self.dtype, len(self.layers))

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, non_blocking: bool = False) -> None:
        """Write k, v ``[KvH, T, D]`` (any device) at positions ``start .. start+T-1`` of ``layer``."""
        end = start + k.shape[1]
        if end > self.capacity:
            raise IndexError(f"position {end - 1} is past the store's capacity of {self.capacity}")
        self.keys[layer][:, start:end].copy_(k, non_blocking=non_blocking)
        self.values[layer][:, start:end].copy_(v, non_blocking=non_blocking)

    def close(self) -> None:
        """Release the memory now (pinned memory is scarce; do not wait for the collector)."""
        self.keys = []
        self.values = []

    @property
    def closed(self) -> bool:
        return not self.keys
