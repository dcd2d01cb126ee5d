"""Sparse offload: the KV in the host store; attention reads sinks, the local window and the
tokens the policy selected, which the prefetcher brings into the device working set.

Per decode step and layer l:
1. the new token's K/V go to the window ring (device) and to the host store (write-back);
2. on a prediction step, the policy scores layer l's candidates (query-aware policies), or a
   producer layer scores the layers it serves (predictive policies, ahead of time);
3. the selector keeps the top tokens; the layer's residency map works out which are missing;
   the prefetcher copies only those (delta fetch);
4. attention waits for layer l's copies only, and reads the working set under its valid mask.
Between predictions (``interval > 1``) the selection is reused and nothing is fetched, except
for dense layers, which take every new candidate at every step.
"""

from __future__ import annotations

import torch

from ..attention import attention_weights
from ..config import SelectionConfig
from ..cpu_cache.gather import default_gather_method, gather_fragments
from ..cpu_cache.host_store import HostKVStore
from ..cpu_cache.prefetcher import Prefetcher
from ..cpu_cache.working_set import WorkingSet
from ..models import ModelAdapter
from ..policies.base import Policy, PolicyContext
from ..selector import Selector
from .base import DecodeKV, KVBackend


class SparseOffloadKV(KVBackend):
    """Owns the host store, the working set and the prefetcher; drives the policy."""

    def __init__(self, adapter: ModelAdapter, capacity: int, selection: SelectionConfig, policy: Policy,
                 device: torch.device, gather_method: str | None = None):
        dims, dtype = adapter.dims, adapter.dtype
        self.dims, self.device, self.policy = dims, device, policy
        self.host = HostKVStore(dims, capacity, dtype, pin=device.type == "cuda")
        policy.bind(PolicyContext(dims=dims, capacity=capacity, device=device, dtype=dtype, adapter=adapter,
                                  host_store=self.host, sinks=selection.sinks, window=selection.window))
        self.selector = Selector(selection, capacity, policy.dense_layers())
        self.working_set = WorkingSet(
            dims.num_layers, dims.num_kv_heads, dims.head_dim, selection.sinks, selection.window,
            [self.selector.slots_for(layer) for layer in range(dims.num_layers)], dtype, device,
        )
        self.prefetcher = Prefetcher(device, dims.num_layers)
        self.gather_method = gather_method or default_gather_method(device)
        self.interval = selection.interval
        self._steps = 0
        self._predict = True
        self._planned: set[int] = set()
        self._fragment_bytes = 2 * dims.head_dim * torch.empty((), dtype=dtype).element_size()
        self._fetched_fragments = torch.zeros((), dtype=torch.long, device=device)

    # ----------------------------------------------------------------------------- prefill
    def prefill_layer(self, layer, x, q, k, v):
        self.prefetcher.write_back(lambda: self.host.write(layer, 0, k, v, non_blocking=True), k, v)
        self.working_set.write_prompt(layer, k, v)
        self.policy.observe_prefill(layer, x, q, k, v)

    # ------------------------------------------------------------------------------ decode
    def begin_step(self, position):
        self._predict = self._steps % self.interval == 0
        self._planned.clear()
        self._steps += 1

    def decode_layer(self, layer, position, x, q, k, v):
        self.working_set.write_token(layer, position, k, v)
        self.prefetcher.write_back(
            lambda: self.host.write(layer, position, k.unsqueeze(1), v.unsqueeze(1), non_blocking=True), k, v
        )
        self.policy.observe_decode(layer, position, x, q, k, v)
        if self._predict and self.policy.plans_ahead and self.policy.is_producer(layer):
            self._plan_ahead(layer, position, x)
        if layer in self.selector.dense_layers:
            candidates = self.selector.candidates(layer, position)
            self._fetch(layer, self.selector.select_all(self.dims.num_kv_heads, candidates, self.device))
        elif self._predict and layer not in self._planned:
            candidates = self.selector.candidates(layer, position)
            scores = self.policy.score(layer, q, candidates)
            self._fetch(layer, self.selector.select(scores, candidates, self.working_set.layers[layer].num_slots))
        self.prefetcher.wait(layer)
        ws = self.working_set.layers[layer]
        positions = self.working_set.positions(layer)
        valid = positions >= 0
        if self.policy.wants_attention:
            weights = attention_weights(q, ws.keys, valid, self.policy.ctx.adapter.scaling)
            self.policy.observe_attention(layer, positions, weights)
        return DecodeKV(ws.keys, ws.values, valid)

    def _plan_ahead(self, producer: int, position: int, x: torch.Tensor) -> None:
        """Select, at a producer layer, for the layers it serves, and start their copies now."""
        scores_by_layer = self.policy.plan(producer, x, lambda layer: self.selector.candidates(layer, position))
        for layer, scores in scores_by_layer.items():
            if layer in self.selector.dense_layers:
                continue
            candidates = self.selector.candidates(layer, position)
            self._fetch(layer, self.selector.select(scores, candidates, self.working_set.layers[layer].num_slots))
            self._planned.add(layer)

    def _fetch(self, layer: int, selected: torch.Tensor) -> None:
        """Make ``selected [KvH, k]`` the layer's active set and copy what is missing."""
        ws = self.working_set.layers[layer]
        plan = ws.residency.update(selected)
        self._fetched_fragments += plan.counts.sum()
        if plan.width == 0:
            return
        host_k, host_v = self.host.keys[layer], self.host.values[layer]

        def copy() -> None:
            gather_fragments(host_k, plan.positions, plan.slots, ws.selected_keys, self.gather_method)
            gather_fragments(host_v, plan.positions, plan.slots, ws.selected_values, self.gather_method)

        self.prefetcher.issue(layer, copy)

    def end_layer(self, layer):
        self.prefetcher.release(layer)

    def end_step(self) -> int:
        fragments = int(self._fetched_fragments)  # one read per step, after the step is done
        self._fetched_fragments.zero_()
        return fragments * self._fragment_bytes

    def device_kv_bytes(self) -> int:
        return self.working_set.nbytes if self.working_set is not None else 0

    def close(self) -> None:
        self.prefetcher.drain()
        self.policy.release()
        self.working_set = None
        self.host.close()
