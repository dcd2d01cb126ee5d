"""Sparse offload: the KV in the host store; attention reads sinks, the local window and the
tokens the policy selected, which the prefetcher brings into the device working set.

The backend only writes, issues copies and waits. What each layer attends, and so what must
be fetched, is decided by ``SelectionPlanner`` (offload_engine/selection); the policy only scores.
Per decode step and layer l:
1. the new token's K/V go to the window ring (device) and to the host store (write-back);
2. the policy observes the token; the planner returns fetch orders (at a producer layer, for the
   layers it serves, ahead of their attention), which go to the prefetcher at once;
3. attention waits for layer l's copies only and reads the filled prefix of its working set
   under its valid mask.
Fragments moved are counted on the device, per step, and read back once per generation.

Sliding-window layers (``LocalRings``) keep their window on the device: no host store, no
working set, no selection; the policy still observes their tokens (a predictor's producer may
be a local layer) but the planner never selects for them.

Prefix reuse (``tbrun serve``): the host store holds every token's K/V, so ``rewind(n)`` puts the
sinks and the last W tokens before ``n`` back into the working set from it, empties every
selected slot (the next step fetches what it selects, as after a prefill), starts the planner
over and rewinds the policy (``Policy.supports_rewind``: state that is a function of the KV
alone). ``extend_layer`` then stores a continuation chunk like a prompt chunk, at its positions.
Only positions whose KV a prefill would have computed are offered for reuse
(``reusable_tokens``): a token decoded while some layer selected has K/V made from sparse
attention, which a fresh prefill of the same conversation would not reproduce. Models with
sliding-window layers (a ring cannot go back) and policies whose state comes from the prompt's
attention (H2O, SnapKV) cannot rewind: the session prefills the whole prompt again.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import native
from ..attention import attention_weights
from ..config import SelectionConfig
from ..cpu_cache.gather import INDEX, default_gather_method, pairs_gatherer
from ..cpu_cache.host_store import HostKVStore, check_host_memory, store_layout
from ..cpu_cache.prefetcher import Prefetcher
from ..cpu_cache.working_set import WorkingSet
from ..models import ModelAdapter, ModelDims
from ..policies.base import Policy, PolicyContext
from ..profiling import PhaseClock
from ..selection import DeferredRows, FetchPlan, Orders, SelectionPlanner, Selector
from ..selection.planner import check_keep_bonus
from .base import DecodeKV, KVBackend
from .dense_device import check_device_memory
from .local_window import LocalRings


def check_sparse_memory(dims: ModelDims, capacity: int, dtype: torch.dtype, device: torch.device,
                        selection: SelectionConfig, slots_per_layer: list[int], policy_bytes: int,
                        global_layers: list[int]) -> None:
    """Refuse, before any of it is allocated, a sparse sequence whose memory does not fit: the host KV store
    (host memory), and the working set (the selected slots, sinks, window and a policy's dense layers, with
    their residency maps), the sliding-window rings, the policy's state (``policy_bytes``: TokenButler's
    compact keys, Quest's page summaries, ...) and the per-step fetch counter on the device (host memory too
    on a CPU run)."""
    host = store_layout(dims, capacity, dtype, stored_layers=len(global_layers)).footprint
    working = WorkingSet.bytes_needed(dims.num_layers, dims.num_kv_heads, dims.head_dim, selection.sinks,
                                      selection.window, slots_per_layer, capacity, dtype, layers=global_layers)
    other = LocalRings.bytes_needed(dims, capacity, dtype) + (capacity + 1) * 8  # rings, _moved_on_device
    parts = (f"the working set {working / 2**30:.2f} GiB, the policy's state {policy_bytes / 2**30:.2f} GiB, "
             f"rings and counters {other / 2**30:.2f} GiB")
    if device.type != "cuda":
        check_host_memory(host + working + policy_bytes + other,
                          f"the sparse mode (the host KV store {host / 2**30:.2f} GiB, {parts})")
        return
    check_host_memory(host)
    check_device_memory(working + policy_bytes + other, device, f"the sparse mode's device state ({parts})",
                        "lower --budget (the working set) or --context (the policy's state grows with it)")


def sized_policy(dims: ModelDims, capacity: int, dtype: torch.dtype, device: torch.device,
                 selection: SelectionConfig, policy: Policy, adapter: ModelAdapter | None = None,
                 model_source: str = "") -> tuple[PolicyContext, Selector, list[int]]:
    """The policy prepared for a sequence (``Policy.prepare``: a predictor loaded, nothing allocated), the
    selector of its budget and each layer's slots; then the sequence's memory checked (``check_sparse_memory``)
    before anything of it is allocated. Without an ``adapter`` (before the model's weights load, ``model_source`` naming the model):
    the same check, so that a sequence that cannot fit is refused before the weights take their time."""
    check_keep_bonus(selection.keep_bonus, policy)
    local_layers = frozenset(dims.local_windows(capacity))
    if adapter is not None:
        model_source = str(getattr(adapter.config, "_name_or_path", "") or "")
    ctx = PolicyContext(dims=dims, capacity=capacity, device=device, dtype=dtype, adapter=adapter, host_store=None,
                        sinks=selection.sinks, window=selection.window, local_layers=local_layers,
                        interval=selection.interval, model_source=model_source)
    policy.prepare(ctx)  # sizes its state (a predictor loaded), allocates nothing
    selector = Selector(selection, capacity, policy.dense_layers(), local_layers)
    slots = [selector.slots_for(layer) for layer in range(dims.num_layers)]
    check_sparse_memory(dims, capacity, dtype, device, selection, slots, policy.state_bytes(),
                        dims.global_layers(capacity))
    return ctx, selector, slots


class SparseOffloadKV(KVBackend):
    """Owns the host store, the working set and the prefetcher; the planner decides, it executes."""

    def __init__(self, adapter: ModelAdapter, capacity: int, selection: SelectionConfig, policy: Policy,
                 device: torch.device, gather_method: str | None = None, clock: PhaseClock | None = None,
                 batched: bool = True, count_attended: bool = False, copy_thread: bool = False):
        dims, dtype = adapter.dims, adapter.dtype
        self.dims, self.device, self.policy = dims, device, policy
        self.use_clock(clock)
        global_layers = dims.global_layers(capacity)
        ctx, selector, slots = sized_policy(dims, capacity, dtype, device, selection, policy, adapter)
        self.host = HostKVStore(dims, capacity, dtype, pin=device.type == "cuda", layers=global_layers)
        self.local = LocalRings(dims, capacity, dtype, device)
        policy.bind(dataclasses.replace(ctx, host_store=self.host))
        self.working_set = WorkingSet(dims.num_layers, dims.num_kv_heads, dims.head_dim, selection.sinks,
                                      selection.window, slots, capacity, dtype, device, layers=global_layers)
        self.planner = SelectionPlanner(selector, policy, self.working_set, selection.interval, batched=batched,
                                        refresh=selection.refresh_layers)
        self.prefetcher = Prefetcher(device, dims.num_layers, copy_thread=copy_thread)
        self.planner.defer = copy_thread  # the copy thread also makes the selections it can, ahead of their copies
        self.gather_method = gather_method or default_gather_method(device)
        if device.type == "cpu" and not copy_thread and self.gather_method == INDEX:
            self.planner.row_copies = self._row_copies  # a producer's native selection copies what it places
        self._gatherers: dict[int, object] = {}  # layer -> its bound fetch (_gatherer)
        self._token_rows: dict[int, object] = {}  # layer -> its bound token write on the CPU, or None (_write_token)
        self._fragment_bytes = 2 * dims.head_dim * torch.empty((), dtype=dtype).element_size()
        self._step = 0
        self._moved_on_host: list[int] = []  # fragments per step, counts known on the host
        self._moved_on_thread: dict[int, int] = {}  # step -> fragments of the selections the copy thread made
        self._moved_on_device = torch.zeros(capacity + 1, dtype=torch.long, device=device)  # per step
        self._exact_upto = 0  # positions [0, n) hold the K/V a dense prefill of their tokens computes
        # attended tokens summed over the steps and the KV heads of every layer but the sliding-window ones
        # (dense layers included: they attend everything), on the device, and what those could have
        # attended (host arithmetic); only with count_attended
        self._attended = torch.zeros((), dtype=torch.long, device=device) if count_attended else None
        self._attendable = 0

    @property
    def notes(self) -> list[str]:
        return self.planner.notes

    # ----------------------------------------------------------------------------- prefill
    @property
    def prefill_reads(self) -> frozenset[str]:
        return self.policy.prefill_reads  # the store itself takes K and V only

    def prefill_layer(self, layer, x, q, k, v):
        self._exact_upto = k.shape[1]
        if layer in self.local:
            self.local.prefill(layer, k, v)
            self.policy.observe_prefill(layer, x, q, k, v)
            return
        self.prefetcher.write_back(lambda: self.host.write(layer, 0, k, v, non_blocking=True), k, v)
        self.working_set.write_prompt(layer, k, v)
        self.policy.observe_prefill(layer, x, q, k, v)

    # ------------------------------------------------------------------------------ decode
    def begin_step(self, position):
        self._moved_on_host.append(0)
        with self.clock.phase("selection"):
            orders = self.planner.begin_step(position)
        if self.planner.attends_everything and self._exact_upto == position:
            self._exact_upto = position + 1  # every layer attends every token: the K/V a prefill computes
        self._issue(orders)

    def _write_token(self, layer: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The decode token's k, v ``[KvH, D]`` into its working-set slot and the host store: on the CPU one
        native call (``native.TokenRows``, bound per layer at its first token); else the working set's write
        and the host's on the write-back stream, off the critical path."""
        rows = self._token_rows.get(layer, False)
        if rows is False:
            rows = self._token_rows[layer] = self._bind_token_rows(layer)
        if rows is not None and rows(k, v, self.working_set.slot_of(position), position):
            return
        self.working_set.write_token(layer, position, k, v)
        self.prefetcher.write_back(
            lambda: self.host.write(layer, position, k.unsqueeze(1), v.unsqueeze(1), non_blocking=True), k, v
        )

    def _bind_token_rows(self, layer: int):
        if self.prefetcher.cuda or self.device.type != "cpu":
            return None
        kernels = native.kernels()
        if kernels is None:
            return None
        keys, values = self.working_set.layer_rows(layer)
        return kernels.bind_token_rows(keys, values, self.host.token_keys[layer], self.host.token_values[layer])

    def decode_layer(self, layer, position, x, q, k, v):
        if layer in self.local:
            return self._decode_local(layer, position, x, q, k, v)
        self._write_token(layer, position, k, v)
        with self.clock.phase("selection"):
            self.policy.observe_decode(layer, position, x, q, k, v)
            orders = self.planner.at_layer(layer, x, q)
        self._issue(orders)
        with self.clock.phase("wait"):
            self.prefetcher.wait(layer)
        used = self.planner.used_slots(layer)
        view = self.working_set.view(layer, used)
        if self._attended is not None:
            self._attended += view.valid.sum()
            self._attendable += view.valid.shape[0] * (position + 1)
        if self.policy.wants_attention:
            weights = attention_weights(q, view.keys, view.valid, self.policy.ctx.adapter.scaling)
            self.policy.observe_attention(layer, self.working_set.positions(layer, used), weights)
        return DecodeKV(view.keys, view.values, view.valid)

    def _decode_local(self, layer, position, x, q, k, v) -> DecodeKV:
        """A sliding-window layer: its ring; the planner may still plan ahead here (producers)."""
        kv = self.local.decode(layer, position, k, v)
        with self.clock.phase("selection"):
            self.policy.observe_decode(layer, position, x, q, k, v)
            orders = self.planner.at_layer(layer, x, q)
        self._issue(orders)
        return kv

    def _row_copies(self, layers: list[int]) -> "native.RowCopies | None":
        """The copies of ``layers``' selection rows (layer-major, then KV heads), from the host store into their
        slots, for a producer's native selection to make as it places them (``SelectionPlanner.row_copies``);
        timed when the step is profiled, so that the breakdown counts them as copying."""
        kernels = native.kernels()
        if kernels is None:
            return None
        rows = []
        for layer in layers:
            bank = self.working_set.bank_of[layer]
            keys, values = bank.selected_keys(layer), bank.selected_values(layer)
            rows += [(self.host.keys[layer][h], self.host.values[layer][h], keys[h], values[h])
                     for h in range(self.dims.num_kv_heads)]
        copies = kernels.bind_row_copies(rows)
        if copies is not None:
            copies.timed = self.clock.enabled
        return copies

    def _issue(self, orders: Orders) -> None:
        """Start the copies of ``orders`` (one prefetcher issue per layer) and count the fragments (those a
        selection already copied included: their time moves from the selection's phase to the copies')."""
        if orders.copied_seconds:
            self.clock.shift("selection", "copy", orders.copied_seconds)
        if isinstance(orders.moved, int):
            self._moved_on_host[-1] += orders.moved
        else:
            self._moved_on_device[self._step] += orders.moved
        for fetch in orders.fetches:
            self._copy(fetch.layer, fetch.plan)

    def _gatherer(self, layer: int):
        """The layer's fetch from the host store into its slots, its tables bound once (``pairs_gatherer``)."""
        gather = self._gatherers.get(layer)
        if gather is None:
            bank = self.working_set.bank_of[layer]
            pairs = ((self.host.keys[layer], bank.selected_keys(layer)),
                     (self.host.values[layer], bank.selected_values(layer)))
            gather = self._gatherers[layer] = pairs_gatherer(pairs, self.gather_method)
        return gather

    def _copy(self, layer: int, plan: FetchPlan | DeferredRows) -> None:
        gather = self._gatherer(layer)

        def move(rows: FetchPlan) -> None:
            gather(rows.positions, rows.slots, rows.counts)

        if isinstance(plan, DeferredRows):  # the copy thread selects first (planner.defer), then copies
            step, moved = self._step, self._moved_on_thread

            def select_and_copy() -> None:
                rows = plan.resolve()
                moved[step] = moved.get(step, 0) + int(rows.counts.sum())  # only this thread writes it
                move(rows)

            self.prefetcher.issue(layer, select_and_copy)
            return

        def copy() -> None:
            with self.clock.phase("copy"):  # (not timed on a copy thread: off the step's path)
                move(plan)

        # the plan's tensors were made on the compute stream and are read on the copy stream
        self.prefetcher.issue(layer, copy, keep_alive=(plan.positions, plan.slots, plan.counts))

    def end_layer(self, layer):
        if layer not in self.local:
            self.prefetcher.release(layer)

    def end_step(self) -> None:
        self._step += 1

    def attended_share(self) -> float | None:
        """Sliding-window layers are not counted (their ring is no selection)."""
        if self._attended is None or not self._attendable:
            return None
        return int(self._attended) / self._attendable  # the one read-back

    def h2d_bytes_per_step(self) -> list[int]:
        self.prefetcher.drain(raise_errors=False)  # the copy thread's counts are complete (its errors were raised
        # at the layers that waited for them)
        on_device = self._moved_on_device[: self._step].tolist()  # the one read-back, at the end
        return [(host + dev + self._moved_on_thread.get(step, 0)) * self._fragment_bytes
                for step, (host, dev) in enumerate(zip(self._moved_on_host, on_device))]

    # ------------------------------------------------------------------------- prefix reuse
    def cannot_rewind(self) -> str:
        if self.host.closed:
            return "its KV is freed"
        if self.local.windows:
            return "its sliding-window layers keep rings, which cannot go back"
        if not self.policy.supports_rewind:
            name = getattr(self.policy, "label", self.policy.name)
            return f"policy {name} scores from the prompt's attention, which a continuation cannot rebuild"
        return ""

    def rewind(self, length: int) -> bool:
        if self.cannot_rewind():
            return False
        self.prefetcher.drain()  # every write-back has landed before the host store is read
        self._exact_upto = min(self._exact_upto, length)
        self.working_set.forget()
        self._restore_fixed(length)
        self.policy.rewind(length)
        self.planner.reset()
        self._step, self._moved_on_host, self._moved_on_thread = 0, [], {}
        self._moved_on_device.zero_()
        if self._attended is not None:
            self._attended.zero_()
            self._attendable = 0
        return True

    def _restore_fixed(self, length: int) -> None:
        """The sinks and the last W tokens before ``length``, from the host store into the working set."""
        sinks = min(self.working_set.sinks, length)
        ranges = [(0, sinks), (max(sinks, length - self.working_set.window), length)]
        for layer in self.host.layers:
            for lo, hi in ranges:
                if hi > lo:
                    self.working_set.write_range(layer, lo, *self._stored(layer, lo, hi))

    def _stored(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v ``[KvH, hi - lo, D]`` of positions ``[lo, hi)`` on the device: one contiguous
        token-major host range per tensor, turned on the device."""
        keys = self.host.token_keys[layer][lo:hi].to(self.device).transpose(0, 1)
        values = self.host.token_values[layer][lo:hi].to(self.device).transpose(0, 1)
        return keys, values

    def prefix_kv(self, layer, length):
        return self._stored(layer, 0, length)

    def extend_layer(self, layer, start, x, q, k, v):
        if self._exact_upto == start:
            self._exact_upto = start + k.shape[1]
        self.prefetcher.write_back(lambda: self.host.write(layer, start, k, v, non_blocking=True), k, v)
        self.working_set.write_range(layer, start, k, v)
        self.policy.observe_extend(layer, start, x, q, k, v)

    def reusable_tokens(self, held: int) -> int:
        return min(held, self._exact_upto)

    def device_kv_bytes(self) -> int:
        return (self.working_set.nbytes if self.working_set is not None else 0) + self.local.nbytes

    def close(self) -> None:
        try:
            self.prefetcher.close()
        finally:
            self.policy.release()
            self.planner.reset()  # its bound selections hold the policy's compact keys
            self.working_set, self._gatherers, self._token_rows = None, {}, {}  # bound: they hold the caches
            self.local.close()
            self.host.close()
