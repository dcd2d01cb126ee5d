"""Dense offload: the KV in the host store, every layer's whole KV copied to the device each step.

This is the baseline the paper beats. Two device staging buffers alternate between the global
layers, so the copy of the next global layer overlaps the computation of the current one
(prefetch one layer ahead). Staging is token-major like the host store (``[capacity, KvH, D]``), so
a layer's prefix ``[:end]`` is one contiguous pinned range copied in one DMA; attention reads
``[KvH, end, D]`` views of it. Sliding-window layers keep their window on the device
(``LocalRings``) and never touch the host store.
"""

from __future__ import annotations

import torch

from ..cpu_cache.host_store import HostKVStore
from ..cpu_cache.prefetcher import Prefetcher
from ..profiling import PhaseClock
from ..models import ModelDims
from .base import DecodeKV, KVBackend
from .dense_device import check_device_memory
from .local_window import LocalRings


class DenseOffloadKV(KVBackend):
    """Host store + double-buffered device staging ``[2][capacity, KvH, D]`` for K and for V."""

    prefill_reads: frozenset[str] = frozenset()  # K and V only

    def __init__(self, dims: ModelDims, capacity: int, dtype: torch.dtype, device: torch.device,
                 clock: PhaseClock | None = None, copy_thread: bool = False):
        self.dims, self.capacity, self.dtype, self.device = dims, capacity, dtype, device
        self.global_layers = dims.global_layers(capacity)
        self.host = HostKVStore(dims, capacity, dtype, pin=device.type == "cuda", layers=self.global_layers)
        check_device_memory(LocalRings.bytes_needed(dims, capacity, dtype), device)
        self.local = LocalRings(dims, capacity, dtype, device)
        # the global layer after each global layer (prefetch order), and each one's staging buffer
        self._next = dict(zip(self.global_layers, self.global_layers[1:]))
        self._buffer = {layer: i % 2 for i, layer in enumerate(self.global_layers)}
        self.prefetcher = Prefetcher(device, dims.num_layers, copy_thread=copy_thread)
        self.use_clock(clock)
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
        shape = (self.capacity, self.dims.num_kv_heads, self.dims.head_dim)
        check_device_memory(4 * self.dims.num_kv_heads * self.capacity * self.dims.head_dim
                            * torch.empty((), dtype=self.dtype).element_size(), self.device)
        self.stage_k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
        self.stage_v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]

    def fetch_copies(self, layer: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device staging, host source) pairs that bring positions ``[0, end)`` of ``layer``:
        each side one contiguous ``[end, KvH, D]`` range."""
        buffer = self._buffer[layer]
        return [(self.stage_k[buffer][:end], self.host.token_keys[layer][:end]),
                (self.stage_v[buffer][:end], self.host.token_values[layer][:end])]

    def _fetch(self, layer: int) -> None:
        """Copy positions ``[0, position)`` of ``layer`` into its staging buffer."""
        copies = self.fetch_copies(layer, self._position)

        def copy() -> None:
            with self.clock.phase("copy"):
                for staging, host in copies:
                    staging.copy_(host, non_blocking=True)

        self.prefetcher.issue(layer, copy, buffer=("stage", self._buffer[layer]))
        self._step_bytes += sum(host.nbytes for _, host in copies)

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
        with self.clock.phase("wait"):
            self.prefetcher.wait(layer)
        if layer in self._next:
            self._fetch(self._next[layer])
        buffer = self._buffer[layer]
        self.stage_k[buffer][position] = k
        self.stage_v[buffer][position] = v
        self.prefetcher.write_back(lambda: self.host.write(layer, position, k.unsqueeze(1), v.unsqueeze(1),
                                                           non_blocking=True), k, v)
        end = position + 1
        return DecodeKV(self.stage_k[buffer][:end].transpose(0, 1), self.stage_v[buffer][:end].transpose(0, 1), None)

    def end_layer(self, layer):
        if layer not in self.local:
            self.prefetcher.release(("stage", self._buffer[layer]))

    def end_step(self) -> None:
        self._moved.append(self._step_bytes)

    def h2d_bytes_per_step(self) -> list[int]:
        return list(self._moved)

    def cannot_rewind(self) -> str:
        if self.local.windows:
            return "its sliding-window layers keep rings, which cannot go back"
        return "its KV is freed" if self.host.closed else ""

    def rewind(self, length: int) -> bool:
        if self.cannot_rewind():
            return False
        self.prefetcher.drain()  # the earlier sequence's write-backs have landed before the prefix is read
        self._moved = []
        return True

    def prefix_kv(self, layer, length):
        """Read back from the host store once per layer (a copy to the device on CUDA)."""
        # one contiguous pinned range per tensor ([length, KvH, D], token-major), turned on the device
        keys = self.host.token_keys[layer][:length].to(self.device).transpose(0, 1)
        values = self.host.token_values[layer][:length].to(self.device).transpose(0, 1)
        return keys, values

    def extend_layer(self, layer, start, x, q, k, v):
        self.prefetcher.write_back(lambda: self.host.write(layer, start, k, v, non_blocking=True), k, v)

    def device_kv_bytes(self) -> int:
        return sum(t.nbytes for t in self.stage_k) + sum(t.nbytes for t in self.stage_v) + self.local.nbytes

    def close(self) -> None:
        try:
            self.prefetcher.close()
        finally:
            self.stage_k, self.stage_v = [], []
            self.local.close()
            self.host.close()
