"""The sparse mode checks all its memory before allocating any: the host KV store, and the working set, the
rings and each policy's state (TokenButler's compact keys and page bounds, Quest's page summaries, H2O's and
SnapKV's scores, critical's value norms), each counted as it is then allocated."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch

from offload_engine import Budget, SelectionConfig, native
from offload_engine.backends.sparse_offload import SparseOffloadKV, check_sparse_memory
from offload_engine.cpu_cache import host_store
from offload_engine.cpu_cache.host_store import HOST_HEADROOM_BYTES, store_layout
from offload_engine.cpu_cache.working_set import WorkingSet
from offload_engine.errors import InsufficientMemoryError
from offload_engine.selection import Selector
from tiny_models import seeded_policy, selecting_model

SELECTION = SelectionConfig(policy="streaming", budget=Budget(tokens=48), sinks=4, window=16)
CAPACITY = 5000  # not a multiple of a page, rows past 4 KiB: partial pages and padded rows are counted too
POLICIES = [
    ("tokenbutler", {}),
    ("tokenbutler", {"key_dtype": "bfloat16"}),
    ("tokenbutler", {"key_dtype": "bfloat16", "page_prefilter": 16}),
    ("tokenbutler", {"page_prefilter": 16}),  # int8 pages: blocks and bound codes for the quad products
    ("critical(tokenbutler)", {}),
    ("quest", {}),
    ("h2o", {}),
    ("snapkv", {}),
    ("streaming", {}),
]


def held_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every tensor storage ``obj`` holds (through attributes, lists, tuples and dicts; each storage
    once; modules, a predictor's weights, left out): what a policy's ``bind`` allocated."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, torch.nn.Module) or id(obj) in seen:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(item, seen) for item in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("offload_engine.") and "Context" not in type(obj).__name__:
        seen.add(id(obj))
        return sum(held_bytes(item, seen) for item in vars(obj).values())
    return 0


@pytest.mark.parametrize("spec,options", POLICIES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_each_policy_states_the_bytes_it_then_allocates(spec, options):
    adapter = selecting_model()
    kernels = native.kernels()
    if options == {"page_prefilter": 16} and (kernels is None or not kernels.int8_quad_products):
        pytest.skip(f"int8 compact keys' pages need the native kernels with AVX512-VNNI: {native.status()}")
    policy = seeded_policy(adapter, spec, **options)
    backend = SparseOffloadKV(adapter, CAPACITY, SELECTION, policy, torch.device("cpu"))
    try:
        expected = policy.state_bytes()
        assert held_bytes(policy) == expected
        if "tokenbutler" in spec:  # the compact keys (and pages) dominate; the count is not a formality
            assert expected >= CAPACITY * adapter.dims.num_kv_heads * (adapter.dims.num_layers - 1) * 8
    finally:
        backend.close()


def test_the_working_set_states_the_bytes_it_allocates():
    adapter = selecting_model()
    policy = seeded_policy(adapter, "tokenbutler")  # layer 0 dense: two banks, one of them the whole capacity
    backend = SparseOffloadKV(adapter, CAPACITY, SELECTION, policy, torch.device("cpu"))
    try:
        ws, dims = backend.working_set, adapter.dims
        assert len(ws.banks) == 2
        slots = [backend.planner.selector.slots_for(layer) for layer in range(dims.num_layers)]
        assert ws.allocated_bytes == ws.bytes_needed(dims.num_layers, dims.num_kv_heads, dims.head_dim,
                                                     SELECTION.sinks, SELECTION.window, slots, CAPACITY,
                                                     adapter.dtype)
    finally:
        backend.close()


def fake_available(monkeypatch, available: int) -> None:
    fake = namedtuple("vm", "available total")(available=available, total=2**40)
    monkeypatch.setattr(host_store.psutil, "virtual_memory", lambda: fake)


def test_a_sequence_whose_policy_state_does_not_fit_is_refused_before_any_allocation(monkeypatch):
    adapter = selecting_model()
    dims, capacity = adapter.dims, 200_000
    policy = seeded_policy(adapter, "tokenbutler")
    # room for the host KV store, the working set, the counter and 1 MiB more: not for the compact keys beside
    # them (16 MiB here), which alone tip it over
    host = store_layout(dims, capacity, adapter.dtype).footprint
    selector = Selector(SELECTION, capacity, policy.dense_layers(), frozenset())
    slots = [selector.slots_for(layer) for layer in range(dims.num_layers)]
    working = WorkingSet.bytes_needed(dims.num_layers, dims.num_kv_heads, dims.head_dim, SELECTION.sinks,
                                      SELECTION.window, slots, capacity, adapter.dtype)
    fake_available(monkeypatch, HOST_HEADROOM_BYTES + host + working + (capacity + 1) * 8 + 2**20)
    made = []
    monkeypatch.setattr(host_store, "allocate_buffer", lambda *a, **k: made.append(a))
    monkeypatch.setattr(type(policy), "bind", lambda *a, **k: made.append("bind"))
    with pytest.raises(InsufficientMemoryError, match=r"the sparse mode \(the host KV store .* GiB, the working "
                                                       r"set .* GiB, the policy's state .* GiB"):
        SparseOffloadKV(adapter, capacity, SELECTION, policy, torch.device("cpu"))
    assert made == []


def test_the_check_counts_exactly_what_the_sequence_allocates(monkeypatch):
    """On the CPU everything is host memory: a sequence is made with exactly its bytes free past the headroom
    and refused with one byte less."""
    adapter = selecting_model()
    probe_policy = seeded_policy(adapter, "tokenbutler")
    probe = SparseOffloadKV(adapter, CAPACITY, SELECTION, probe_policy, torch.device("cpu"))
    needed = (store_layout(adapter.dims, CAPACITY, adapter.dtype).footprint + probe.working_set.allocated_bytes
              + probe_policy.state_bytes() + probe._moved_on_device.nbytes)  # no sliding-window rings here
    probe.close()
    fake_available(monkeypatch, HOST_HEADROOM_BYTES + needed - 1)
    with pytest.raises(InsufficientMemoryError):
        SparseOffloadKV(adapter, CAPACITY, SELECTION, seeded_policy(adapter, "tokenbutler"), torch.device("cpu"))
    fake_available(monkeypatch, HOST_HEADROOM_BYTES + needed)
    SparseOffloadKV(adapter, CAPACITY, SELECTION, seeded_policy(adapter, "tokenbutler"), torch.device("cpu")).close()


def test_on_cuda_the_device_state_is_checked_against_free_device_memory(monkeypatch):
    """The CUDA branch's arithmetic, with the driver's answers faked (no GPU here): host KV against host memory,
    working set + policy state against the device's free memory, the message saying what to lower."""
    adapter = selecting_model()
    dims, capacity = adapter.dims, 4096
    slots = [SELECTION.budget.tokens] * dims.num_layers
    layers = list(range(dims.num_layers))
    fake_available(monkeypatch, 2**40)
    free = [0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 2**34))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    device = torch.device("cuda")
    with pytest.raises(InsufficientMemoryError, match=r"device state .* on cuda but only 0.00 GiB is free: lower "
                                                       r"--budget \(the working set\) or --context"):
        check_sparse_memory(dims, capacity, adapter.dtype, device, SELECTION, slots, 10 * 2**20, layers)
    free[0] = 2**30
    check_sparse_memory(dims, capacity, adapter.dtype, device, SELECTION, slots, 10 * 2**20, layers)
    with pytest.raises(InsufficientMemoryError, match=r"device state"):
        check_sparse_memory(dims, capacity, adapter.dtype, device, SELECTION, slots, 2**30, layers)


def test_before_the_weights_load_a_policy_is_sized_from_the_model_source_alone():
    """``sized_policy`` without an adapter (the CLI's check before the weights load): TokenButler takes the
    shipped predictor the model's source names, at the interval's choice, as it will with the adapter; a model
    with none shipped is refused with what to pass."""
    from transformers import LlamaConfig

    from offload_engine.backends.sparse_offload import sized_policy
    from offload_engine.models import dims_from_config
    from offload_engine.policies.tokenbutler import TokenButlerPolicy
    from offload_engine.predictor.checkpoint import PredictorError

    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=64, vocab_size=64, max_position_embeddings=8192)
    dims, device = dims_from_config(smollm2), torch.device("cpu")
    selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=512), sinks=4, window=16)
    source = "/home/u/.cache/tbrun/models/SmolLM2-135M-Instruct"
    for interval, shipped in ((1, "smollm2-135m-instruct "), (4, "smollm2-135m-instruct-interval4 ")):
        policy = TokenButlerPolicy()
        ctx, selector, slots = sized_policy(dims, 8192, torch.float32, device,
                                     dataclasses.replace(selection, interval=interval), policy,
                                     model_source=source)
        assert ctx.adapter is None and policy.predictor_source.startswith(shipped)
        assert policy.state_bytes() > 8192 * 29 * 3 * 16  # the compact keys of 29 consumer layers, d' 16
        assert slots == [selector.slots_for(layer) for layer in range(30)] and slots[1] > 0
    with pytest.raises(PredictorError, match="pass --predictor DIR"):
        sized_policy(dims, 8192, torch.float32, device, selection, TokenButlerPolicy(),
                     model_source="meta-llama/Llama-3.1-8B")


def test_the_cli_refuses_a_sparse_sequence_that_cannot_fit_before_loading_the_weights(tiny_model_dir, monkeypatch):
    """`tbrun generate --offload --policy quest`: the KV fits in host memory, the KV with the working set and
    Quest's page summaries does not: exit code 2 with the parts named, and the weights never load."""
    from typer.testing import CliRunner

    import offload_engine.models as models
    from offload_engine.models import model_dims
    from tbrun_cli.main import app

    capacity = 200_000
    footprint = model_dims(tiny_model_dir).kv_footprint(capacity, torch.float32)
    fake_available(monkeypatch, HOST_HEADROOM_BYTES + footprint.global_bytes + footprint.ring_bytes + 2**20)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the memory check refused the sequence")

    monkeypatch.setattr(models, "load_model", no_weights)
    result = CliRunner().invoke(app, ["generate", "--model", tiny_model_dir, "--prompt", "hi", "--offload",
                                      "--policy", "quest", "--context", str(capacity), "--allow-rope-scaling"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "the sparse mode (the host KV store" in text and "the policy's state" in text
