"""Prefill holds one layer's KV on the device; host memory is checked before allocation and
freed at the end of every sequence, Ctrl-C included."""

from __future__ import annotations

import sys
from collections import namedtuple

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.cpu_cache import host_store
from offload_engine.cpu_cache.host_store import HostKVStore
from offload_engine.errors import ConfigError, InsufficientMemoryError
from offload_engine.models import ModelAdapter
from offload_engine.policies import build_policy
from tiny_models import tiny_model

PROMPT = list(range(1, 200))


def one_layer_kv_bytes(adapter: ModelAdapter, tokens: int) -> int:
    return adapter.dims.kv_bytes_per_token(adapter.dtype) * tokens // adapter.dims.num_layers


@pytest.mark.parametrize("mode", [KVMode.DENSE_OFFLOAD, KVMode.SPARSE_OFFLOAD])
def test_prefill_keeps_one_layer_of_kv_on_the_device(mode):
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    selection = SelectionConfig(policy="streaming", budget=Budget(tokens=32), sinks=4, window=16)
    engine = Engine(adapter, EngineConfig(context=256, mode=mode, selection=selection))
    stats = engine.generate(PROMPT, SamplingConfig(max_new_tokens=2)).stats
    working_set = stats.decode_kv_bytes if mode is KVMode.SPARSE_OFFLOAD else 0
    assert stats.prefill_peak_kv_bytes == one_layer_kv_bytes(adapter, len(PROMPT)) + working_set
    # the sparse working set is bounded by the budget, not by the context
    if mode is KVMode.SPARSE_OFFLOAD:
        assert working_set < one_layer_kv_bytes(adapter, 256) * adapter.dims.num_layers / 4


def test_dense_device_mode_holds_the_whole_cache():
    adapter = ModelAdapter(tiny_model("llama"))
    stats = Engine(adapter, EngineConfig(context=256)).generate(PROMPT, SamplingConfig(max_new_tokens=2)).stats
    assert stats.decode_kv_bytes == adapter.dims.kv_bytes_per_token(adapter.dtype) * 256


def test_host_store_refuses_before_allocating(monkeypatch):
    adapter = ModelAdapter(tiny_model("llama"))
    fake = namedtuple("vm", "available total")(available=10 * 2**20, total=2**30)
    monkeypatch.setattr(host_store.psutil, "virtual_memory", lambda: fake)
    allocations = []
    monkeypatch.setattr(host_store, "allocate_buffer", lambda *a, **k: allocations.append(a))
    with pytest.raises(InsufficientMemoryError, match=r"needs .* GiB of host memory but only 0.01 GiB"):
        HostKVStore(adapter.dims, 1_000_000, torch.float32)
    assert allocations == []


def test_host_store_layout_and_release():
    adapter = ModelAdapter(tiny_model("llama"))
    store = HostKVStore(adapter.dims, 64, torch.float32, pin=False)
    dims = adapter.dims
    assert store.keys[0].shape == (dims.num_kv_heads, 64, dims.head_dim)
    assert store.keys[0][0, 5].is_contiguous()  # one (KV head, token) fragment is contiguous
    k = torch.randn(dims.num_kv_heads, 3, dims.head_dim)
    store.write(1, 10, k, -k)
    torch.testing.assert_close(store.keys[1][:, 10:13], k)
    store.close()
    assert store.closed


class InterruptAfter:
    """An on_token callback that presses Ctrl-C after ``n`` tokens."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def __call__(self, token: int) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode", list(KVMode))
def test_ctrl_c_returns_partial_output_and_frees_the_store(mode):
    adapter = ModelAdapter(tiny_model("llama"))
    engine = Engine(adapter, EngineConfig(context=256, mode=mode))
    backends = []
    original = engine._new_backend
    engine._new_backend = lambda *args: backends.append(original(*args)) or backends[-1]
    result = engine.generate(PROMPT, SamplingConfig(max_new_tokens=20), on_token=InterruptAfter(3))
    assert result.finish_reason == "interrupted" and result.stats.interrupted
    assert len(result.token_ids) == 3
    host = getattr(backends[0], "host", None)
    assert host is None or host.closed


def test_repeated_engine_builds_release_every_store():
    adapter = ModelAdapter(tiny_model("llama"))
    stores = []
    original_init = HostKVStore.__init__

    def tracking_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        stores.append(self)

    HostKVStore.__init__ = tracking_init
    try:
        for _ in range(3):
            Engine(adapter, EngineConfig(context=128, mode=KVMode.DENSE_OFFLOAD)).generate(
                PROMPT[:20], SamplingConfig(max_new_tokens=2))
    finally:
        HostKVStore.__init__ = original_init
    assert len(stores) == 3 and all(store.closed for store in stores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned memory exists only with CUDA")
def test_host_store_is_pinned_on_cuda_and_not_leaked():
    adapter = ModelAdapter(tiny_model("llama"))
    store = HostKVStore(adapter.dims, 1024, torch.float16)
    assert store.pinned and all(t.is_pinned() for t in store.keys + store.values)
    store.close()
    model = tiny_model("llama").cuda()
    cuda_adapter = ModelAdapter(model)
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) if hasattr(
        torch.cuda, "host_memory_stats") else None
    for _ in range(3):
        Engine(cuda_adapter, EngineConfig(context=2048, mode=KVMode.SPARSE_OFFLOAD, device="cuda",
                                          selection=SelectionConfig(policy="streaming", budget=Budget(tokens=128),
                                                                    sinks=4, window=32))
               ).generate(PROMPT, SamplingConfig(max_new_tokens=4))
    if before is not None:
        import gc

        gc.collect()
        after = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
        assert after <= before


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streaming", "critical(tokenbutler)", "dense"])
def test_a_tiles_recorded_prefill_replays_as_the_tiled_prefill_itself(policy):
    """``record_prefill`` on an engine with ``synthetic_kv_tile`` N records the prompt's first N tokens once;
    replayed by engines of the same tile (any mode, any policy, at two prompt lengths from one record), each
    gives what its own tiled prefill gives: the same logits at every step, the tile's projections before RoPE
    kept on the record after the first replay (q only for a policy that reads it), per prefill chunk. A record
    of other tokens, or one replayed by an engine without the tile, is refused."""
    adapter = ModelAdapter(tiny_model("llama", initializer_range=0.2))
    prompt = torch.randint(5, adapter.dims.vocab_size, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    targets = torch.randint(5, adapter.dims.vocab_size, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    mode = KVMode.DENSE_DEVICE if policy == "dense" else KVMode.SPARSE_OFFLOAD
    selection = (SelectionConfig() if policy == "dense"
                 else SelectionConfig(policy=policy, budget=Budget.parse("40%"), sinks=4, window=8))
    options = {"random_weights": True} if "tokenbutler" in policy else {}

    def engine(chunk: int, **config) -> Engine:
        return Engine(adapter, EngineConfig(context=128, mode=mode, selection=selection, synthetic_kv=True,
                                            synthetic_kv_tile=32, prefill_chunk=chunk, **config),
                      policy=None if policy == "dense" else build_policy(policy, **options))

    records = {}
    for chunk in (4096, 5):  # 5: prefill chunks that split the tile's copies
        records[chunk] = record = Engine(adapter, EngineConfig(context=128, synthetic_kv=True, synthetic_kv_tile=32,
                                                               prefill_chunk=chunk)).record_prefill(prompt)
        assert record.prompt == tuple(prompt[:32]) and record.layers[0].k.shape[1] == 32
        for length in (90, 70):  # one record, two lengths: observations are not shared across them
            own = engine(chunk).score_continuation(prompt[:length], targets, keep_logits=True)
            for _ in range(2):  # the second replay reads the k and v the first filled (tile_filled)
                replayed = engine(chunk).score_continuation(prompt[:length], targets, keep_logits=True,
                                                            prefill=record)
                assert torch.equal(own.logits, replayed.logits), (policy, length, chunk)
            assert own.logits.std() > 0.1  # varied logits (init std 0.2), not one repeated token's
        (kept,) = record.tile_before_rope.values()  # every layer's, made at the first replay
        assert len(kept) == adapter.dims.num_layers
        assert sorted(length for _, length in record.tile_filled) == [70, 90]
        for (_, length), layers in record.tile_filled.items():
            assert len(layers) == adapter.dims.num_layers
            assert all(k.shape[1] == v.shape[1] == length for k, v in layers.values())
        reads_q = policy in ("snapkv", "h2o")  # q kept only for a policy that reads it
        assert all((q is not None) == reads_q and k.shape[2] == 32 for q, k in kept.values())
    engine(5).score_continuation(prompt, targets, prefill=records[4096])  # another chunk: its own projections
    assert len(records[4096].tile_before_rope) == 2
    sampling = SamplingConfig(max_new_tokens=2, ignore_eos=True)
    with pytest.raises(ConfigError, match="first 32 tokens"):
        Engine(adapter, EngineConfig(context=128, synthetic_kv=True, synthetic_kv_tile=32)).generate(
            prompt[1:], sampling, prefill=records[4096])
    with pytest.raises(ConfigError, match="another prompt"):
        Engine(adapter, EngineConfig(context=128)).generate(prompt, sampling, prefill=records[4096])


def test_a_tiles_fill_is_kept_only_where_host_memory_allows(monkeypatch):
    """A tile's k and v filled to a length stay on the record only with TILE_FILL_HEADROOM times their bytes of
    host memory free; without, every replay fills again, and gives the same logits."""
    from offload_engine import engine as engine_module
    from offload_engine.engine import TILE_FILL_HEADROOM, tile_fill_fits

    # the embedded model's shape at 128k: 6.0 GB of k and v, kept with 20 GiB free, not with 16
    assert tile_fill_fits(30, 3, 131072, 64, 4, 20 * 2**30) and not tile_fill_fits(30, 3, 131072, 64, 4, 16 * 2**30)
    adapter = ModelAdapter(tiny_model("llama", initializer_range=0.2))
    prompt = torch.randint(5, adapter.dims.vocab_size, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    targets = prompt[:4]
    config = EngineConfig(context=128, mode=KVMode.SPARSE_OFFLOAD, synthetic_kv=True, synthetic_kv_tile=32,
                          selection=SelectionConfig(policy="streaming", budget=Budget.parse("40%"), sinks=4, window=8))
    record = Engine(adapter, EngineConfig(context=128, synthetic_kv=True, synthetic_kv_tile=32)).record_prefill(prompt)
    own = Engine(adapter, config).score_continuation(prompt, targets, keep_logits=True)
    asked = []

    def with_little_free(*sizes):  # the engine's question, answered as if a third of the fill's bytes were free
        asked.append(sizes[:-1])
        layers, kv_heads, length, head_dim, itemsize = sizes[:-1]
        fill_bytes = 2 * layers * kv_heads * length * head_dim * itemsize
        assert tile_fill_fits(*sizes[:-1], TILE_FILL_HEADROOM * fill_bytes)
        return tile_fill_fits(*sizes[:-1], fill_bytes // 3)

    monkeypatch.setattr(engine_module, "tile_fill_fits", with_little_free)
    for _ in range(2):
        replayed = Engine(adapter, config).score_continuation(prompt, targets, keep_logits=True, prefill=record)
        assert torch.equal(own.logits, replayed.logits)
    assert record.tile_filled == {}
    dims = adapter.dims
    assert asked == [(dims.num_layers, dims.num_kv_heads, 90, dims.head_dim, 4)] * 2  # asked again at each replay


TILED_POLICIES = ["streaming", "quest", "snapkv", "h2o", "oracle", "random", "tokenbutler", "critical(tokenbutler)",
                  "critical(h2o)", "dense"]


@pytest.mark.parametrize("policy", TILED_POLICIES)
def test_a_tiled_fill_builds_only_the_queries_and_inputs_its_policy_reads(policy, monkeypatch):
    """A tiled fill (``synthetic_kv_tile``) hands the backend zeros with no memory behind them for the x and q
    its policy does not read at prefill (``Policy.prefill_reads``), and that changes nothing: every step's
    logits equal those of a fill that builds both (a policy that read what it does not declare would select
    differently from zeros, at this small budget)."""
    from offload_engine.backends.dense_device import DenseDeviceKV
    from offload_engine.backends.sparse_offload import SparseOffloadKV

    adapter = ModelAdapter(tiny_model("llama", initializer_range=0.3))  # peaked attention: selections matter
    prompt = torch.randint(5, adapter.dims.vocab_size, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    targets = torch.randint(5, adapter.dims.vocab_size, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    mode = KVMode.DENSE_DEVICE if policy == "dense" else KVMode.SPARSE_OFFLOAD
    selection = (SelectionConfig() if policy == "dense"
                 else SelectionConfig(policy=policy, budget=Budget.parse("20%"), sinks=2, window=4))
    backend = DenseDeviceKV if policy == "dense" else SparseOffloadKV
    handed = []  # (x, q) strides of every layer's fill
    prefill_layer = backend.prefill_layer

    def spy(self, layer, x, q, k, v):
        handed.append((x.stride(), q.stride()))
        return prefill_layer(self, layer, x, q, k, v)

    monkeypatch.setattr(backend, "prefill_layer", spy)

    options = {"random_weights": True} if "tokenbutler" in policy else {}
    if policy == "snapkv":
        options = {"window": 4}  # its default window of 32 would take the whole budget: the votes would not count

    def scored():
        engine = Engine(adapter, EngineConfig(context=128, mode=mode, selection=selection, synthetic_kv=True,
                                              synthetic_kv_tile=32),
                        policy=None if policy == "dense" else build_policy(policy, **options))
        return engine.score_continuation(prompt, targets, keep_logits=True).logits

    reads = frozenset() if policy == "dense" else build_policy(policy, **options).prefill_reads
    declared = scored()
    for pair in handed:
        assert {name for name, strides in zip("xq", pair) if all(step == 0 for step in strides)} == {"x", "q"} - reads
    assert len(handed) == adapter.dims.num_layers
    monkeypatch.setattr(backend, "prefill_reads", frozenset({"x", "q"}))  # everything built, as before
    handed.clear()
    everything = scored()
    assert not any(all(step == 0 for step in strides) for pair in handed for strides in pair)
    assert torch.equal(declared, everything), policy
    assert everything.std() > 0.1


@pytest.mark.parametrize("chunk", [4096, 5])  # 5: prefill chunks that split the tile's copies
def test_a_synthetic_kv_cache_can_repeat_a_real_prefix(chunk):
    """synthetic_kv_tile N: the prompt's first N tokens are prefilled for real, and every layer's x and v
    are that prefix's, repeated to the prompt's length (position t holds position t mod N), its q and k
    those of position t mod N turned to position t: in layer 0 (whose q and k depend on the token alone)
    exactly a real prefill's of the prefix repeated, and in every layer each copy's scores among its own
    positions the prefix's (RoPE's scores depend on distances only), with no two copies alike."""
    from offload_engine.engine import GenerationStats, _RecordingKV

    adapter = ModelAdapter(tiny_model("llama"))
    prompt = torch.randint(5, adapter.dims.vocab_size, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    tiled = Engine(adapter, EngineConfig(context=96, synthetic_kv=True, synthetic_kv_tile=32, prefill_chunk=chunk))
    recorder = _RecordingKV()
    with torch.inference_mode():
        logits = tiled._model_prefill(prompt, recorder, GenerationStats(), None)
    real = Engine(adapter, EngineConfig(context=96, prefill_chunk=chunk)).record_prefill(prompt[:32])
    assert torch.equal(logits, real.logits) and len(recorder.layers) == adapter.dims.num_layers
    source = torch.arange(70) % 32
    for layer, prefix in zip(recorder.layers, real.layers):
        assert layer.k.shape[1] == layer.v.shape[1] == layer.q.shape[1] == layer.x.shape[0] == 70
        assert torch.equal(layer.v, prefix.v[:, source]) and torch.equal(layer.x, prefix.x[source])
        assert torch.equal(layer.k[:, :32], prefix.k) and torch.equal(layer.q[:, :32], prefix.q)
        group = adapter.dims.num_heads // adapter.dims.num_kv_heads
        for copy in (slice(32, 64), slice(64, 70)):  # the second copy, and the third's first 6 positions
            keys = layer.k[:, copy].repeat_interleave(group, dim=0)
            own = prefix.k[:, : keys.shape[1]].repeat_interleave(group, dim=0)
            torch.testing.assert_close(layer.q[:, copy] @ keys.transpose(1, 2),
                                       prefix.q[:, : keys.shape[1]] @ own.transpose(1, 2), rtol=1e-4, atol=1e-5)
            assert (layer.k[:, copy] - prefix.k[:, : keys.shape[1]]).abs().amax() > 1e-3  # turned: not a copy
    periodic = [prompt[i % 32] for i in range(70)]
    whole = Engine(adapter, EngineConfig(context=96, prefill_chunk=chunk)).record_prefill(periodic).layers[0]
    torch.testing.assert_close(recorder.layers[0].k, whole.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorder.layers[0].q, whole.q, rtol=1e-5, atol=1e-6)
    selection = SelectionConfig(policy="streaming", budget=Budget.parse("50%"), sinks=4, window=8)
    sparse = Engine(adapter, EngineConfig(context=96, mode=KVMode.SPARSE_OFFLOAD, selection=selection,
                                          synthetic_kv=True, synthetic_kv_tile=32))
    result = sparse.generate(prompt, SamplingConfig(max_new_tokens=3, ignore_eos=True))
    assert len(result.token_ids) == 3 and result.stats.prompt_tokens == 70
    for bad in (dict(synthetic_kv_tile=8), dict(synthetic_kv=True, synthetic_kv_tile=-1)):
        with pytest.raises(ConfigError, match="synthetic_kv_tile"):
            EngineConfig(context=96, **bad)


def _mapping_flags(address: int) -> str:
    """The permission field of the /proc/self/maps entry holding ``address`` ("rw-p": private)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, flags = line.split()[:2]
            start, end = (int(part, 16) for part in span.split("-"))
            if start <= address < end:
                return flags
    raise AssertionError(f"no mapping holds address {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
def test_host_buffer_is_a_private_mapping_that_asks_for_huge_pages():
    """Transparent huge pages go to private anonymous memory that asks for them; a shared anonymous mapping
    (mmap's default) is shmem and got none under the usual settings, though it asked."""
    buffer = host_store.HostBuffer(8 << 20)
    flags = _mapping_flags(buffer.address)
    assert flags.startswith("rw") and flags.endswith("p"), flags
    with open("/proc/self/smaps") as smaps:
        lines = smaps.read().splitlines()
    header = next(i for i, line in enumerate(lines)
                  if not line[0].isupper() and int(line.split("-")[0], 16) <= buffer.address
                  < int(line.split()[0].split("-")[1], 16))
    advice = next(line for line in lines[header + 1:] if line.startswith("VmFlags:"))
    assert " hg" in advice + " ", advice  # MADV_HUGEPAGE recorded on the mapping
    assert int(buffer.bytes.sum()) == 0  # zero-filled, as an anonymous mapping is
    buffer.bytes[:] = 7
    assert int(buffer.bytes.sum()) == 7 * buffer.nbytes
