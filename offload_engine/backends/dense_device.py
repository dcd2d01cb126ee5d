"""Dense on the device: the whole KV cache resident, preallocated for the context (baseline)."""

from __future__ import annotations

import torch

from .. import native
from ..cpu_cache.host_store import check_host_memory
from ..errors import InsufficientMemoryError
from ..models import ModelDims
from .base import DecodeKV, KVBackend
from .local_window import LocalRings


def check_device_memory(needed: int, device: torch.device, what: str = "the KV cache",
                        hint: str = "add --offload to keep it in host memory, or lower --context") -> None:
    """Refuse before allocating when the device cannot hold ``needed`` bytes (of ``what``; ``hint``: what to
    do). On CUDA, free is what the driver reports plus what torch's caching allocator holds unused (a
    prefill leaves that cache full; torch returns it to the driver when an allocation needs it)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
        if needed > free:
            raise InsufficientMemoryError(
                f"{what} needs {needed / 2**30:.2f} GiB on {device} but only {free / 2**30:.2f} GiB "
                f"is free: {hint}."
            )
    else:
        check_host_memory(needed, what)


class DenseDeviceKV(KVBackend):
    """``keys[l]``, ``values[l]``: ``[KvH, capacity, D]`` on the device for each global layer;
    sliding-window layers keep a ring of their window (``LocalRings``)."""

    prefill_reads: frozenset[str] = frozenset()  # K and V only

    def __init__(self, dims: ModelDims, capacity: int, dtype: torch.dtype, device: torch.device):
        footprint = dims.kv_footprint(capacity, dtype)
        check_device_memory(footprint.global_bytes + footprint.ring_bytes, device)
        self.local = LocalRings(dims, capacity, dtype, device)
        shape = (dims.num_kv_heads, capacity, dims.head_dim)
        self.keys = {layer: torch.empty(shape, dtype=dtype, device=device) for layer in dims.global_layers(capacity)}
        self.values = {layer: torch.empty(shape, dtype=dtype, device=device) for layer in self.keys}
        self._token_rows: dict[int, object] = {}  # layer -> its bound token write on the CPU, or None

    def prefill_layer(self, layer, x, q, k, v):
        if layer in self.local:
            self.local.prefill(layer, k, v)
            return
        length = k.shape[1]
        self.keys[layer][:, :length] = k
        self.values[layer][:, :length] = v

    def decode_layer(self, layer, position, x, q, k, v):
        if layer in self.local:
            return self.local.decode(layer, position, k, v)
        rows = self._token_rows.get(layer, False)
        if rows is False:  # on the CPU one native call writes both (native.TokenRows), bound at the first token
            kernels = native.kernels() if self.keys[layer].is_cpu else None
            rows = self._token_rows[layer] = (kernels.bind_token_rows(self.keys[layer], self.values[layer])
                                              if kernels is not None else None)
        if rows is None or not rows(k, v, position):
            self.keys[layer][:, position] = k
            self.values[layer][:, position] = v
        end = position + 1
        return DecodeKV(self.keys[layer][:, :end], self.values[layer][:, :end], None)

    def rewind(self, length: int) -> bool:
        # positions past ``length`` are overwritten before they are read
        return not self.cannot_rewind()

    def cannot_rewind(self) -> str:
        if self.local.windows:
            return "its sliding-window layers keep rings, which cannot go back"
        return "" if self.keys else "its KV is freed"

    def prefix_kv(self, layer, length):
        return self.keys[layer][:, :length], self.values[layer][:, :length]

    def extend_layer(self, layer, start, x, q, k, v):
        end = start + k.shape[1]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v

    def device_kv_bytes(self) -> int:
        return sum(t.nbytes for t in self.keys.values()) + sum(t.nbytes for t in self.values.values()) + self.local.nbytes

    def close(self) -> None:
        self.keys, self.values, self._token_rows = {}, {}, {}  # the bound writes hold the caches too
        self.local.close()
