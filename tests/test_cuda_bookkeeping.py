"""The CUDA bookkeeping of the offload path, forced on CPU tensors.

- The prefetcher with a recording stand-in for ``torch.cuda``: plans kept alive (``record_stream``
  and a held reference) until their copy's event completes, and ordering of the copy stream.
- The host store: page-aligned buffers of exact size registered once each and unregistered by
  ``close()``; the admission check counts exactly the registered bytes; the layout arithmetic of
  stores of 16-128 GiB; every host transfer view is one contiguous range.
- Gathers with counts move the real entries only.
"""

from __future__ import annotations

import contextlib
import gc
from collections import namedtuple

import pytest
import torch

from offload_engine.backends.dense_offload import DenseOffloadKV
from offload_engine.cpu_cache import host_store
from offload_engine.cpu_cache.gather import INDEX, gather_fragments
from offload_engine.cpu_cache.host_store import (
    BUFFER_BYTES, PAGE_BYTES, HostKVStore, PinnedMemoryError, store_layout,
)
from offload_engine.cpu_cache.prefetcher import Prefetcher
from offload_engine.models import ModelDims

from tiny_models import tiny_model


# ------------------------------------------------------------------------- stand-in for CUDA


class FakeEvent:
    def __init__(self, log: list):
        self.log, self.complete = log, False

    def record(self, stream=None):
        self.log.append(("record", self, stream))
        self.complete = False

    def query(self) -> bool:
        return self.complete


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event))

    def synchronize(self):
        self.log.append(("synchronize", self.name))

    def __repr__(self):
        return self.name


class FakeCudaStreams:
    """Records every stream and event operation; events complete only when the test says so."""

    def __init__(self):
        self.log: list = []
        self.events: list[FakeEvent] = []
        self.kept: list[tuple[torch.Tensor, str]] = []
        self._names = iter(["copy", "writeback"])
        self.compute = FakeStream("compute", self.log)
        self.active = self.compute

    def new_stream(self):
        return FakeStream(next(self._names), self.log)

    def new_event(self):
        self.events.append(FakeEvent(self.log))
        return self.events[-1]

    def current(self):
        return self.active

    @contextlib.contextmanager
    def use(self, stream):
        previous, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = previous

    def keep_for(self, tensor, stream):
        self.kept.append((tensor, stream.name))


def forced_prefetcher(layers: int = 3):
    streams = FakeCudaStreams()
    return Prefetcher(torch.device("cpu"), layers, streams=streams), streams


def test_plan_tensors_are_recorded_on_the_copy_stream_and_held_until_the_copy_completes():
    prefetcher, streams = forced_prefetcher()
    plan = [torch.arange(4), torch.arange(4, 8), torch.tensor([3])]  # positions, slots, counts
    ran_on = []
    prefetcher.issue(1, lambda: ran_on.append(streams.active.name), keep_alive=plan)
    assert ran_on == ["copy"]
    assert [(id(t), s) for t, s in streams.kept] == [(id(t), "copy") for t in plan]
    ids = [id(t) for t in plan]
    del plan
    gc.collect()
    held = [t for _, kept in prefetcher.in_flight for t in kept]
    assert [id(t) for t in held] == ids  # still referenced: the allocator cannot hand them out
    finished = prefetcher.in_flight[0][0]
    assert ("record", finished, prefetcher.copy_stream) in streams.log  # after the copy was enqueued
    prefetcher.issue(2, lambda: None, keep_alive=[torch.zeros(1)])
    assert len(prefetcher.in_flight) == 2  # the first copy has not completed: both held
    finished.complete = True
    prefetcher.issue(0, lambda: None)
    assert len(prefetcher.in_flight) == 1 and prefetcher.in_flight[0][0] is not finished


def test_copy_waits_for_compute_write_back_and_the_last_reader():
    prefetcher, streams = forced_prefetcher()
    prefetcher.release(("stage", 0))
    reader = prefetcher.consumed[("stage", 0)]
    streams.log.clear()
    prefetcher.issue(0, lambda: streams.log.append(("copy_fn", streams.active.name)), buffer=("stage", 0))
    kinds = [entry[:3] if entry[0] != "record" else ("record",) for entry in streams.log]
    assert kinds[:4] == [("wait_stream", "copy", "compute"), ("wait_stream", "copy", "writeback"),
                         ("wait_event", "copy", reader), ("copy_fn", "copy")]
    assert streams.log[4] == ("record", prefetcher.fetched[0], prefetcher.copy_stream)
    prefetcher.wait(0)
    assert streams.log[-1] == ("wait_event", "compute", prefetcher.fetched[0])


def test_write_back_sources_are_kept_for_the_write_back_stream_and_drain_forgets_plans():
    prefetcher, streams = forced_prefetcher()
    k, v = torch.ones(2, 4), torch.zeros(2, 4)
    prefetcher.write_back(lambda: None, k, v)
    assert [(t is k or t is v, s) for t, s in streams.kept] == [(True, "writeback"), (True, "writeback")]
    prefetcher.issue(0, lambda: None, keep_alive=[torch.zeros(2)])
    prefetcher.drain()
    assert prefetcher.in_flight == []
    assert ("synchronize", "copy") in streams.log and ("synchronize", "writeback") in streams.log


def test_cpu_prefetcher_runs_copies_at_once_and_keeps_nothing():
    prefetcher = Prefetcher(torch.device("cpu"), 2)
    ran = []
    prefetcher.issue(0, lambda: ran.append(1), keep_alive=[torch.zeros(1)])
    assert ran == [1] and not prefetcher.cuda


# --------------------------------------------------------------------------------- host store


class FakeRegistrar:
    """Stands in for cudaHostRegister / cudaHostUnregister: records what is page-locked."""

    def __init__(self, fail: bool = False):
        self.registered: dict[int, int] = {}
        self.fail = fail

    def register(self, address: int, nbytes: int) -> None:
        if self.fail:
            raise RuntimeError("cudaHostRegister returned error 1")
        assert address % PAGE_BYTES == 0 and nbytes % PAGE_BYTES == 0
        assert address not in self.registered
        self.registered[address] = nbytes

    def unregister(self, address: int) -> None:
        del self.registered[address]

    @property
    def pinned_bytes(self) -> int:
        return sum(self.registered.values())


def tiny_dims(layers: int = 3, kv_heads: int = 2, head_dim: int = 16) -> ModelDims:
    from offload_engine.models import ModelAdapter

    dims = ModelAdapter(tiny_model("llama")).dims
    return dims.__class__(**{**{f: getattr(dims, f) for f in dims.__dataclass_fields__},
                             "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim})


def test_store_registers_exactly_what_the_admission_check_counted(monkeypatch):
    counted = []
    monkeypatch.setattr(host_store, "check_host_memory", lambda needed, what="": counted.append(needed))
    registrar = FakeRegistrar()
    store = HostKVStore(tiny_dims(), 1000, torch.bfloat16, pin=True, registrar=registrar)
    assert counted == [registrar.pinned_bytes] and registrar.pinned_bytes == store.layout.footprint
    assert len(registrar.registered) == len(store.buffers) == 1  # a small store: one buffer
    assert store.layout.footprint - store.nbytes < PAGE_BYTES
    view = store.keys[2][:, 5:9]  # a view that outlives the store (a leak elsewhere)
    store.close()
    assert registrar.registered == {} and store.closed
    assert view.sum() == 0  # the memory itself is still valid, only unpinned


def test_a_store_over_one_buffer_spreads_whole_layers_over_a_few_buffers(monkeypatch):
    monkeypatch.setattr(host_store, "BUFFER_BYTES", 3 * 64 * 1024)
    registrar = FakeRegistrar()
    dims = tiny_dims(layers=5)
    store = HostKVStore(dims, 1024, torch.float32, pin=True, registrar=registrar)  # 128 KiB per tensor
    layout = store_layout(dims, 1024, torch.float32, buffer_bytes=3 * 64 * 1024)
    assert store.layout == layout and layout.per_buffer == 1 and len(registrar.registered) == 10
    # each K and V lies inside one registered buffer
    for tensor in store.token_keys + store.token_values:
        start = tensor.data_ptr()
        assert any(a <= start and start + tensor.nbytes <= a + n for a, n in registrar.registered.items())
    store.close()
    assert registrar.registered == {}


def test_collected_store_unregisters_its_buffers():
    registrar = FakeRegistrar()
    store = HostKVStore(tiny_dims(), 64, torch.float32, pin=True, registrar=registrar)
    assert registrar.registered
    del store
    gc.collect()
    assert registrar.registered == {}


def test_a_view_that_outlives_its_allocation_keeps_the_memory_pinned_until_it_goes():
    """``allocate_host(...).transpose(0, 1)`` keeps only the view: the memory must stay page-locked as long
    as it (a copy from unpinned memory would be refused, or staged and synchronised, on a GPU)."""
    registrar = FakeRegistrar()
    view = host_store.allocate_host((64, 2, 8), torch.float32, pin=True, registrar=registrar).transpose(0, 1)
    gc.collect()
    assert registrar.pinned_bytes == PAGE_BYTES  # the tensor allocate_host returned is gone, its view is not
    start = view.data_ptr()
    assert any(a <= start < a + n for a, n in registrar.registered.items())
    view.fill_(1.0)
    assert view.sum() == 64 * 2 * 8
    del view
    gc.collect()
    assert registrar.registered == {}


def test_refused_registration_is_a_clear_error():
    with pytest.raises(PinnedMemoryError, match=r"could not page-lock .*ulimit -l"):
        HostKVStore(tiny_dims(), 64, torch.float32, pin=True, registrar=FakeRegistrar(fail=True))


def test_refused_before_allocating_counts_the_page_rounded_footprint(monkeypatch):
    dims = tiny_dims()
    layout = store_layout(dims, 100_000, torch.float32)
    fake = namedtuple("vm", "available total")(available=layout.footprint + host_store.HOST_HEADROOM_BYTES - 1,
                                               total=2**40)
    monkeypatch.setattr(host_store.psutil, "virtual_memory", lambda: fake)
    allocations = []
    monkeypatch.setattr(host_store, "allocate_buffer", lambda *a: allocations.append(a))
    with pytest.raises(host_store.InsufficientMemoryError):
        HostKVStore(dims, 100_000, torch.float32, pin=False)
    assert allocations == []


LLAMA_8B = dict(layers=32, kv_heads=8, head_dim=128)


@pytest.mark.parametrize("context", [65536, 131072, 262144, 524288])  # 8, 16, 32, 64 GiB in bf16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # up to 128 GiB
def test_large_store_layouts_pin_exactly_their_bytes_in_a_few_buffers(context, dtype):
    dims = tiny_dims(**LLAMA_8B)
    layout = store_layout(dims, context, dtype)
    nbytes = host_store.host_store_bytes(dims, context, dtype)
    assert layout.footprint == nbytes  # whole pages already: not one byte more is pinned
    assert layout.buffers == -(-nbytes // BUFFER_BYTES) and layout.buffers <= 16
    assert all(layout.buffer_bytes(b) <= BUFFER_BYTES for b in range(layout.buffers))
    # torch's pinned allocator would round each K or V up to a power of two
    assert layout.footprint <= 2 * dims.num_layers * 1 << (layout.tensor_bytes - 1).bit_length()


def test_odd_sizes_round_each_buffer_to_pages_only():
    dims = tiny_dims(layers=3, kv_heads=3, head_dim=24)
    layout = store_layout(dims, 1001, torch.bfloat16)
    assert 0 < layout.footprint - host_store.host_store_bytes(dims, 1001, torch.bfloat16) < PAGE_BYTES + 6 * 256
    assert all(offset % 256 == 0 for _, offset in map(layout.place, range(layout.tensors)))


def test_every_host_transfer_is_one_contiguous_range():
    dims = tiny_dims(kv_heads=4)
    store = HostKVStore(dims, 64, torch.float32, pin=False)
    assert store.keys[0].shape == (4, 64, 16) and store.keys[0][1, 7].is_contiguous()
    k = torch.randn(4, 5, 16)
    store.write(1, 10, k, -k)  # a prompt chunk
    store.write(1, 15, k[:, :1], -k[:, :1])  # one decoded token
    assert torch.equal(store.keys[1][:, 10:15], k) and torch.equal(store.values[1][:, 15], -k[:, 0])
    assert store.token_keys[1][10:15].is_contiguous() and store.token_keys[1][15:16].is_contiguous()
    backend = DenseOffloadKV(dims, 64, torch.float32, torch.device("cpu"))
    backend._allocate_staging()
    for staging, host in backend.fetch_copies(1, 33):
        assert staging.is_contiguous() and host.is_contiguous() and host.shape == (33, 4, 16)
    backend.close()
    store.close()


def test_a_gather_with_counts_moves_only_the_real_entries():
    src = torch.randn(2, 10, 8)
    positions = torch.tensor([[9, 3, 0, 0], [4, 0, 0, 0]])
    slots = torch.tensor([[0, 1, 3, 3], [2, 3, 3, 3]])  # padding into the trash slot 3
    dst = torch.full((2, 4, 8), 5.0)
    gather_fragments(src, positions, slots, dst, INDEX, counts=torch.tensor([2, 1]))
    assert torch.equal(dst[:, 3], torch.full((2, 8), 5.0))  # the trash slot never written
    assert torch.equal(dst[0, :2], src[0, [9, 3]]) and torch.equal(dst[1, 2], src[1, 4])
    with pytest.raises(ValueError, match="counts must be"):
        gather_fragments(src, positions, slots, dst, INDEX, counts=torch.tensor([2, 1, 0]))


# ------------------------------------------------------------------ the engine, CUDA bookkeeping forced


class SettledCudaStreams(FakeCudaStreams):
    """A stand-in whose events complete at once (CPU work is synchronous)."""

    def new_event(self):
        event = super().new_event()
        event.query = lambda: True
        return event


@pytest.fixture
def forced_cuda_bookkeeping(monkeypatch):
    """Offload backends on CPU with CUDA's bookkeeping: the prefetcher's CUDA branch (streams,
    events, kept-alive plans) and residency plans padded to the full selection width, made by the
    torch bookkeeping a GPU runs."""
    from offload_engine.backends import dense_offload, sparse_offload
    from offload_engine.selection import residency

    prefetchers = []

    def cuda_prefetcher(device, layers, copy_thread=False):
        assert not copy_thread, "CUDA copies run on a copy stream, never on a copy thread"
        prefetchers.append(Prefetcher(device, layers, streams=SettledCudaStreams()))
        return prefetchers[-1]

    monkeypatch.setattr(sparse_offload, "Prefetcher", cuda_prefetcher)
    monkeypatch.setattr(dense_offload, "Prefetcher", cuda_prefetcher)
    original_init = residency.ResidencyMap.__init__

    def padded_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        assert hasattr(self, "_exact_width") and hasattr(self, "on_host"), \
            "ResidencyMap no longer has _exact_width or on_host: update this fixture"
        self._exact_width = False  # what CUDA does: no host read of the widest head's count
        self.on_host = False  # and its torch bookkeeping, not the CPU's numpy one

    monkeypatch.setattr(residency.ResidencyMap, "__init__", padded_init)
    return prefetchers


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode,policy,budget", [("dense-offload", "dense", None), ("sparse-offload", "streaming", 24),
                                                ("sparse-offload", "quest", 24)])
def test_engine_with_cuda_bookkeeping_forced_gives_the_cpu_tokens(forced_cuda_bookkeeping, monkeypatch, mode, policy,
                                                                  budget):
    from offload_engine import Budget, Engine, EngineConfig, SamplingConfig, SelectionConfig
    from offload_engine.models import ModelAdapter

    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4, initializer_range=0.2))
    prompt = torch.randint(0, 320, (53,), generator=torch.Generator().manual_seed(4))

    def run() -> list[int]:
        selection = SelectionConfig(policy=policy, budget=None if budget is None else Budget(tokens=budget),
                                    sinks=2, window=4)
        engine = Engine(adapter, EngineConfig(context=70, mode=mode, selection=selection, prefill_chunk=16))
        return engine.generate(prompt, SamplingConfig(max_new_tokens=10)).token_ids

    forced = run()
    assert forced_cuda_bookkeeping and all(p.cuda for p in forced_cuda_bookkeeping)
    monkeypatch.undo()
    assert forced == run()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy", ["quest", "streaming"])
def test_sparse_prefix_reuse_with_cuda_bookkeeping_forced_gives_the_cpu_tokens(forced_cuda_bookkeeping, monkeypatch,
                                                                               policy):
    """A follow-up turn through ``Session`` (rewind drains the write-backs, the continuation writes back
    through the write-back stream) gives what the plain CPU path gives, and reuses the same prefix."""
    from offload_engine import Budget, Engine, EngineConfig, SamplingConfig, SelectionConfig
    from offload_engine.models import ModelAdapter
    from offload_engine.session import Session

    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4, initializer_range=0.2))
    prompt = torch.randint(0, 320, (41,), generator=torch.Generator().manual_seed(5)).tolist()
    greedy = SamplingConfig(max_new_tokens=6, ignore_eos=True)

    def run() -> tuple[list[int], int]:
        selection = SelectionConfig(policy=policy, budget=Budget(tokens=16), sinks=2, window=4)
        session = Session(Engine(adapter, EngineConfig(context=96, mode="sparse-offload", selection=selection,
                                                       prefill_chunk=16)))
        first, _ = session.generate(prompt, greedy)
        second, reuse = session.generate(prompt[:30] + first.token_ids + [7, 8, 9], greedy)
        session.close()
        return second.token_ids, reuse.reused_tokens

    forced = run()
    assert forced_cuda_bookkeeping and all(p.cuda for p in forced_cuda_bookkeeping)
    assert forced[1] == 30
    monkeypatch.undo()
    assert forced == run()


@pytest.mark.parametrize("importable,self_check,skips", [
    (False, None, True),  # no cupy / Triton: skipped
    (True, "CUDARuntimeError: cudaErrorInsufficientDriver", True),  # a wheel for another CUDA: skipped, with why
    (True, "wrong values", False),  # ran and got it wrong: a bug, the test runs (and fails)
    (True, None, False),  # passes its self-check: runs
])
def test_gpu_tests_skip_a_gather_method_that_cannot_run_here_but_not_one_that_is_wrong(
        monkeypatch, importable, self_check, skips):
    import gpu_helpers

    gpu_helpers._cannot_run.cache_clear()
    monkeypatch.setattr(gpu_helpers, "available_gather_methods",
                        lambda device: ["index", "zero-copy-cupy"] if importable else ["index"])
    monkeypatch.setattr(gpu_helpers, "self_check_failure", lambda method, device: self_check)
    try:
        if skips:
            with pytest.raises(pytest.skip.Exception, match=r"'zero-copy-cupy' (needs a library|imports but)"):
                gpu_helpers.require_gather_method("zero-copy-cupy")
        else:
            gpu_helpers.require_gather_method("zero-copy-cupy")
    finally:
        gpu_helpers._cannot_run.cache_clear()


def test_device_memory_counts_what_torchs_cache_holds_unused_as_free(monkeypatch):
    """After a prefill torch's caching allocator holds freed blocks the driver reports as used: they are
    free for the KV cache (torch returns them to the driver when an allocation needs them)."""
    from offload_engine.backends.dense_device import check_device_memory
    from offload_engine.errors import InsufficientMemoryError

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * gib)
    cuda = torch.device("cuda", 0)
    check_device_memory(7 * gib, cuda)  # 1 free + 6 cached unused
    with pytest.raises(InsufficientMemoryError, match=r"needs 7\.01 GiB .* only 7\.00 GiB is free: add --offload"):
        check_device_memory(7 * gib + 10 * 2**20, cuda)
