"""Dense offload: the KV in the host store, every layer's whole KV copied to the device each step.

This is the baseline the paper beats. Two device staging buffers alternate between the global
layers, so the copy of the next global layer overlaps the computation of the current one
(prefetch one layer ahead). Sliding-window layers keep their window on the device
(``LocalRings``) and never touch the host store.
"""

from __future__ import annotations

import torch

from ..cpu_cache.host_store import HostKVStore
from ..cpu_cache.prefetcher import Prefetcher
from ..models import ModelDims
from .base import DecodeKV, KVBackend
from .dense_device import check_device_memory
from .local_window import LocalRings


class DenseOffloadKV(KVBackend):
    """Host store + double-buffered device staging ``[2][KvH, capacity, D]`` for K and for V."""

    def __init__(self, dims: ModelDims, capacity: int, dtype: torch.dtype, device: torch.device):
        self.dims, self.capacity, self.dtype, self.device = dims, capacity, dtype, device
        self.global_layers = dims.global_layers(capacity)
        self.host = HostKVStore(dims, capacity, dtype, pin=device.type == "cuda", layers=self.global_layers)
        check_device_memory(LocalRings.bytes_needed(dims, capacity, dtype), device)
        self.local = LocalRings(dims, capacity, dtype, device)
        # the global layer after each global layer (prefetch order), and each one's staging buffer
        self._next = dict(zip(self.global_layers, self.global_layers[1:]))
        self._buffer = {layer: i % 2 for i, layer in enumerate(self.global_layers)}
        self.prefetcher = Prefetcher(device, dims.num_layers)
        self.stage_k: list[torch.Tensor] = []
        self.stage_v: list[torch.Tensor] = []
        self._position = 0
        self._step_bytes = 0
        self._moved: list[int] = []

    def prefill_layer(self, layer, x, q, k, v):
        if layer in self.local:
            self.local.prefill(layer, k, v)
            return
        self.prefetcher.write_back(lambda: self.host.write(layer, 0, k, v, non_blocking=True), k, v)

    def _allocate_staging(self) -> None:
        """Allocated at the first decode step, so prefill holds one layer's KV at most."""
        shape = (self.dims.num_kv_heads, self.capacity, self.dims.head_dim)
        check_device_memory(4 * self.dims.num_kv_heads * self.capacity * self.dims.head_dim
                            * torch.empty((), dtype=self.dtype).element_size(), self.device)
        self.stage_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
        self.stage_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]

    def _fetch(self, layer: int) -> None:
        """Copy positions ``[0, position)`` of ``layer`` into its staging buffer."""
        end, buffer = self._position, self._buffer[layer]

        def copy() -> None:
            self.stage_k[buffer][:, :end].copy_(self.host.keys[layer][:, :end], non_blocking=True)
            self.stage_v[buffer][:, :end].copy_(self.host.values[layer][:, :end], non_blocking=True)

        self.prefetcher.issue(layer, copy, buffer=("stage", buffer))
        self._step_bytes += 2 * self.host.keys[layer][:, :end].nbytes

    def begin_step(self, position):
        if not self.stage_k and self.global_layers:
            self._allocate_staging()
        self._position = position
        self._step_bytes = 0
        if self.global_layers:
            self._fetch(self.global_layers[0])

    def decode_layer(self, layer, position, x, q, k, v):
        if layer in self.local:
            return self.local.decode(layer, position, k, v)
        self.prefetcher.wait(layer)
        if layer in self._next:
            self._fetch(self._next[layer])
        buffer = self._buffer[layer]
        self.stage_k[buffer][:, position] = k
        self.stage_v[buffer][:, position] = v
        self.prefetcher.write_back(lambda: self.host.write(layer, position, k.unsqueeze(1), v.unsqueeze(1),
                                                           non_blocking=True), k, v)
        end = position + 1
        return DecodeKV(self.stage_k[buffer][:, :end], self.stage_v[buffer][:, :end], None)

    def end_layer(self, layer):
        if layer not in self.local:
            self.prefetcher.release(("stage", self._buffer[layer]))

    def end_step(self) -> None:
        self._moved.append(self._step_bytes)

    def h2d_bytes_per_step(self) -> list[int]:
        return list(self._moved)

    def device_kv_bytes(self) -> int:
        return sum(t.nbytes for t in self.stage_k) + sum(t.nbytes for t in self.stage_v) + self.local.nbytes

    def close(self) -> None:
        self.prefetcher.drain()
        self.stage_k, self.stage_v = [], []
        self.local.close()
        self.host.close()
