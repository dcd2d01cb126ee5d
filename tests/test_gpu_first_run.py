"""What the first run on a GPU must show (``pytest -m gpu``; skipped with a reason without CUDA).

- TokenButler plan-ahead on CUDA (copy stream, events, kept-alive plans) gives the CPU's tokens.
- bf16 dense offload and sparse offload at a budget covering every token equal dense on the device.
- The gather kernels move exactly the plans' real entries (padding leaves the trash slot alone).
- No pinned memory is left after a store is closed.
- Prefill attention of a long prompt stays within a bounded workspace (a fused kernel runs).
"""

from __future__ import annotations

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig
from offload_engine.attention import prefill_attention
from offload_engine.cpu_cache.gather import ALL_METHODS, INDEX, gather_fragments
from offload_engine.cpu_cache.host_store import HostKVStore
from offload_engine.models import ModelAdapter
from offload_engine.policies.tokenbutler import TokenButlerPolicy
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

from gpu_helpers import require_gather_method
from tiny_models import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
NEW_TOKENS = 12
PROMPT_LEN = 61


def lively_model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A tiny Llama at init std 0.2, so greedy decoding does not repeat one token."""
    return tiny_model("llama", num_hidden_layers=5, initializer_range=0.2).to(dtype=dtype, device=device)


def prompt_ids(device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 320, (PROMPT_LEN,), generator=torch.Generator().manual_seed(11)).to(device)


def tokenbutler_run(device: str) -> list[int]:
    model = lively_model(device=device)
    adapter = ModelAdapter(model)
    torch.manual_seed(0)
    predictor = TokenButlerPredictor(PredictorConfig.for_model(adapter.dims, producer_every=2, dim=8, hidden=32))
    selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=24), sinks=2, window=4)
    config = EngineConfig(context=PROMPT_LEN + NEW_TOKENS + 3, mode=KVMode.SPARSE_OFFLOAD, selection=selection,
                          device=device, prefill_chunk=16)
    engine = Engine(adapter, config, policy=TokenButlerPolicy(predictor=predictor.eval()))
    return engine.generate(prompt_ids(device), SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids


def test_tokenbutler_plan_ahead_on_cuda_equals_the_cpu_run():
    assert tokenbutler_run("cuda") == tokenbutler_run("cpu")


def scored_logits(mode: KVMode) -> torch.Tensor:
    """Teacher-forced logits ``[N, V]`` of a fixed continuation (no divergence cascade)."""
    model = lively_model(torch.bfloat16, "cuda")
    adapter = ModelAdapter(model)
    context = PROMPT_LEN + NEW_TOKENS + 3
    selection = SelectionConfig(policy="dense", budget=Budget(tokens=context), sinks=2, window=4)
    engine = Engine(adapter, EngineConfig(context=context, mode=mode, selection=selection, device="cuda",
                                          prefill_chunk=16))
    target = torch.randint(0, 320, (NEW_TOKENS,), generator=torch.Generator().manual_seed(12)).tolist()
    return engine.score_continuation(prompt_ids("cuda").tolist(), target, keep_logits=True).logits.float().cpu()


@pytest.mark.parametrize("mode", [KVMode.DENSE_OFFLOAD, KVMode.SPARSE_OFFLOAD])
def test_bf16_offload_modes_at_full_budget_equal_dense(mode):
    dense, logits = scored_logits(KVMode.DENSE_DEVICE), scored_logits(mode)
    torch.testing.assert_close(logits, dense, atol=0.1, rtol=0.02)  # bf16 through different attention kernels
    top2 = dense.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.25  # rows whose winner no rounding difference can flip
    assert clear.any() and torch.equal(logits.argmax(-1)[clear], dense.argmax(-1)[clear])


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != INDEX])
def test_kernels_move_exactly_the_real_entries(method):
    require_gather_method(method)
    store = HostKVStore(ModelAdapter(tiny_model("llama", num_key_value_heads=4)).dims, 4099, torch.bfloat16,
                        pin=True)
    src = store.keys[0]
    src.copy_(torch.randn(src.shape).to(torch.bfloat16))
    counts = torch.tensor([0, 1, 777, 1000], device="cuda")
    width, slot_count = 1000, 1001
    positions = torch.zeros(4, width, dtype=torch.long)
    slots = torch.full((4, width), slot_count - 1, dtype=torch.long)
    for h, n in enumerate(counts.tolist()):
        positions[h, :n] = torch.randperm(4099)[:n]
        slots[h, :n] = torch.randperm(slot_count - 1)[:n]
    positions, slots = positions.cuda(), slots.cuda()
    sentinel = torch.full((4, slot_count, src.shape[2]), 3.0, dtype=torch.bfloat16, device="cuda")
    expected, got = sentinel.clone(), sentinel.clone()
    gather_fragments(src, positions, slots, expected, INDEX, counts)
    gather_fragments(src, positions, slots, got, method, counts)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), expected.cpu())
    written = (got != sentinel).any(dim=-1).sum().item()  # fragments the kernel wrote
    assert written == counts.sum().item()  # bytes moved = real count x fragment bytes
    store.close()


def test_no_pinned_memory_is_left_after_close():
    dims = ModelAdapter(tiny_model("llama")).dims
    store = HostKVStore(dims, 100_000, torch.bfloat16)
    assert store.pinned and all(t.is_pinned() for t in store.keys + store.values)
    leaked_view = store.keys[1][:, :10]
    store.close()
    assert not leaked_view.is_pinned()  # unregistered even though a view is still alive
    for _ in range(3):  # repeated stores do not accumulate pinned memory either
        HostKVStore(dims, 100_000, torch.bfloat16).close()


def test_long_prefill_attention_stays_within_a_bounded_workspace():
    heads, kv_heads, length, dim = 32, 8, 32768, 128  # Llama-3.1-8B's attention at 32k
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = prefill_attention(q, k, v, dim**-0.5, 4096)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # expanded K and V (2 x 256 MiB) + the output (256 MiB) + blocks; scores would be 16 GiB per block
    assert extra < 2 * 2**30, f"prefill attention used {extra / 2**30:.2f} GiB beyond its inputs"
    reference = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, -64:].float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1),
        attn_mask=torch.ones(64, length, dtype=torch.bool, device="cuda").tril(length - 64), scale=dim**-0.5)
    torch.testing.assert_close(out[:, :, -64:].float(), reference, atol=2e-2, rtol=2e-2)
