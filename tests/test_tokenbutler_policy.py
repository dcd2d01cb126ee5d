"""The tokenbutler policy: compact key cache, planning, selection rules, and decoding in the engine."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig, native
from offload_engine.models import ModelAdapter
from offload_engine.policies import build_policy
from offload_engine.policies.base import Candidates, PolicyContext
from offload_engine.selection import extend_runs
from offload_engine.policies.tokenbutler import TokenButlerPolicy, shipped_predictor_for
from offload_engine.predictor.checkpoint import PredictorError, load_checkpoint, save_checkpoint
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor, quantize_query
from offload_engine.selection import Selector

from tiny_models import tiny_model

NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def predictor_for(adapter: ModelAdapter, seed: int = 0, **sizes) -> TokenButlerPredictor:
    torch.manual_seed(seed)
    config = PredictorConfig.for_model(adapter.dims, **{"producer_every": 2, "dim": 8, "hidden": 32, **sizes})
    return TokenButlerPredictor(config).eval()


def bound_policy(adapter: ModelAdapter, capacity: int = 64, rope_pairs: int = 0, query_heads: int | None = None,
                 **options) -> TokenButlerPolicy:
    policy = TokenButlerPolicy(predictor=predictor_for(adapter, rope_pairs=rope_pairs, query_heads=query_heads), **options)
    policy.bind(PolicyContext(dims=adapter.dims, capacity=capacity, device=torch.device("cpu"), dtype=torch.float32,
                              adapter=adapter, host_store=None, sinks=2, window=4))
    return policy


def as_the_cpu_scores(queries: torch.Tensor, dim: int, key_dtype: str) -> torch.Tensor:
    """Importance queries ``[..., d']`` as the CPU's native kernel multiplies them into the compact keys: where
    it takes int8 keys in integer products (AVX512-VNNI, d' a multiple of 4), the scaled query quantised
    to int8 (``quantize_query``), returned unscaled for ``head_scores``; else as they are."""
    kernels = native.kernels()
    if key_dtype != "int8" or kernels is None or not kernels.int8_quad_products or dim % 4:
        return queries
    scale = 1.0 / math.sqrt(dim)
    return quantize_query(queries * scale) / scale


def prefilled_and_one_decode(policy: TokenButlerPolicy, adapter: ModelAdapter, length: int = 20):
    """Prefill a random prompt of ``length`` into ``policy``, then one decode step at position ``length``:
    (per-layer prompt tensors, x_new ``[E]``, k_new ``[KvH, D]``)."""
    tensors = prompt_tensors(adapter, length)
    for layer, (x, q, k, v) in enumerate(tensors):
        policy.observe_prefill(layer, x, q, k, v)
    x_new, k_new = torch.randn(adapter.dims.hidden_size), torch.randn(adapter.dims.num_kv_heads, adapter.dims.head_dim)
    for layer in range(adapter.dims.num_layers):
        policy.observe_decode(layer, length, x_new, None, k_new, None)
    return tensors, x_new, k_new


def prompt_tensors(adapter: ModelAdapter, length: int, seed: int = 0):
    """Per layer (x [T, E], q [H, T, D], k, v [KvH, T, D]) of a random prompt (from the model itself)."""
    from offload_engine.predictor.teacher import layer_states

    ids = torch.randint(0, 320, (1, length), generator=torch.Generator().manual_seed(seed))
    out = []
    for state in layer_states(adapter, ids):
        out.append((state.x, state.q, state.k, torch.zeros_like(state.k)))
    return out


# ------------------------------------------------------------------------- selection rules
@pytest.mark.parametrize("selected, hi, expected", [
    ([3, 4, 9, -1], 12, [3, 4, 5, 6, 9, 10, -1, -1]),  # a run of 2 gains 2, a run of 1 gains 1
    ([0, 1, 2, 10], 12, [0, 1, 2, 3, 4, 5, 10, 11]),
    ([5, 7, -1, -1], 12, [5, 6, 7, 8, -1, -1, -1, -1]),  # extensions that meet merge without repeats
    ([8, 9, 10, -1], 11, [8, 9, 10, -1, -1, -1, -1, -1]),  # nothing past hi
    ([-1, -1], 12, [-1, -1, -1, -1]),
])
def test_run_extension_doubles_each_run(selected, hi, expected):
    assert extend_runs(torch.tensor([selected]), 0, hi).tolist() == [expected]


def test_run_extension_is_per_kv_head():
    out = extend_runs(torch.tensor([[2, 3, 4, -1], [6, -1, -1, -1]]), 2, 20)
    assert out.tolist() == [[2, 3, 4, 5, 6, 7, -1, -1], [6, 7, -1, -1, -1, -1, -1, -1]]


def test_selector_keeps_top_scores_then_neighbors_on_a_hand_built_pattern():
    selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=2 + 4 + 3), sinks=2, window=4, neighbors=1)
    selector = Selector(selection, capacity=64, dense_layers=frozenset({0}))
    candidates = selector.candidates(layer=1, position=29)
    assert (candidates.lo, candidates.hi, candidates.keep) == (2, 26, 3)
    scores = torch.full((2, candidates.count), -1.0)
    scores[0, [10 - 2, 11 - 2, 25 - 2]] = 5.0  # head 0 likes 10, 11 and the last candidate 25
    scores[1, [3 - 2, 17 - 2, 4 - 2]] = torch.tensor([3.0, 2.0, 1.0])
    chosen = selector.select(scores, candidates, slots=selector.slots_for(1))
    assert chosen[0][chosen[0] >= 0].tolist() == [10, 11, 12, 25]  # 26 is past the candidates
    assert chosen[1][chosen[1] >= 0].tolist() == [3, 4, 5, 17, 18]
    dense = selector.candidates(layer=0, position=29)
    assert dense.keep == dense.count == 24  # layer 0 (tokenbutler's dense layer) keeps all


# ----------------------------------------------------------------------------------- policy
def test_policy_is_registered_and_plans_for_its_consumers():
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=5))
    assert isinstance(build_policy("tokenbutler", predictor=predictor_for(adapter)), TokenButlerPolicy)
    policy = bound_policy(adapter)
    assert policy.dense_layers() == frozenset({0})
    assert [layer for layer in range(5) if policy.is_producer(layer)] == [0, 2]


@pytest.mark.parametrize("reduction, key_dtype", [("mean", "float32"), ("max", "float32"), ("mean", "bfloat16"),
                                                  ("max", "bfloat16")])
def test_compact_cache_holds_projected_keys_and_plan_scores_them(reduction, key_dtype):
    """The cache holds the projected keys in its dtype; the plan's scores are those of the stored keys
    (bfloat16 ones widened: what a float32 model on the CPU stores by default with the native kernels where the
    CPU has no AVX512-VNNI; int8 keys, the default where it has, in test_int8_keys_score_alike_...)."""
    adapter = ModelAdapter(tiny_model("qwen2", num_hidden_layers=4))
    policy = bound_policy(adapter, group_reduction=reduction, key_dtype=key_dtype)
    predictor = policy.predictor
    tensors, x_new, k_new = prefilled_and_one_decode(policy, adapter)
    stored = getattr(torch, key_dtype)
    assert policy.cache.keys.dtype == stored
    torch.testing.assert_close(policy.cache.read(3, 0, 20), predictor.project_keys(3, tensors[3][2]).to(stored))
    torch.testing.assert_close(policy.cache.read(3, 20, 21)[:, 0],
                               predictor.project_keys(3, k_new.unsqueeze(1))[:, 0].to(stored))
    candidates = Candidates(lo=2, hi=17, keep=3, position=20)
    layers, scores = policy.plan(0, tensors[0][0][-1], candidates)
    assert list(layers) == [1, 2] and scores.shape == (2, 2, 15)
    plan = {layer: scores[i] for i, layer in enumerate(layers)}
    queries = predictor.importance_queries(0, tensors[0][0][-1])  # [2, H, d']
    kernels = native.kernels()
    if key_dtype == "bfloat16" and kernels is not None and kernels.bf16_pair_products and predictor.config.dim % 2 == 0:
        # the native kernel takes bfloat16 pair products: the scaled query rounded to bfloat16, as a GPU's matmul
        scale = 1.0 / math.sqrt(predictor.config.dim)
        queries = (queries * scale).bfloat16().float() / scale
    for layer in (1, 2):
        keys = torch.cat([predictor.project_keys(layer, tensors[layer][2]), predictor.project_keys(layer, k_new.unsqueeze(1))], 1)
        keys = keys.to(stored).float()
        heads = predictor.head_scores(queries[layer - 1].unsqueeze(0), keys)[:, 0]  # [H, 21]
        if reduction == "max":
            expected = predictor.group_max(heads)[:, 2:17]
        else:  # the group's mean softmax over positions 0..19 (the token being decoded excluded)
            expected = torch.softmax(heads[:, :20], -1).view(2, 2, 20).mean(1)[:, 2:17]
        torch.testing.assert_close(plan[layer], expected)
        assert plan[layer].dtype == torch.float32
        torch.testing.assert_close(policy.score(layer, None, candidates), plan[layer])  # the per-layer path


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_int8_keys_score_alike_in_the_native_kernels_and_in_torch(reduction, monkeypatch):
    """int8 keys: torch's scores (the path a GPU takes, which dequantises nothing: the scale multiplies the
    logits) are the scores of the dequantised keys; so are the CPU's native ones (codes times each token's
    scale, in the kernel), against the query as the kernel takes it (quantised to int8 where the CPU has
    AVX512-VNNI)."""
    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    adapter = ModelAdapter(tiny_model("qwen2", num_hidden_layers=4))
    policy = bound_policy(adapter, group_reduction=reduction, key_dtype="int8")
    tensors, _, _ = prefilled_and_one_decode(policy, adapter)
    candidates = Candidates(lo=2, hi=17, keep=3, position=20)
    x = tensors[0][0][-1]
    _, described = policy.plan(0, x, candidates, describe=True)
    assert described.scales is not None and described.native_rows()[2] is not None
    native_scores = described.compute()
    c = policy.predictor.config
    grouped = policy._queries[0].reshape(2, c.num_kv_heads, c.query_group, c.dim)
    as_scored = as_the_cpu_scores(grouped, c.dim, "int8")  # (asks the kernels, before they are switched off)
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    torch_scores = policy.plan(0, x, candidates)[1]
    dequantised = torch.stack([policy.cache.read(layer, 0, 20).transpose(-1, -2) for layer in (1, 2)])

    def scores(queries: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(queries / math.sqrt(c.dim), dequantised)  # [2, KvH, g, 20]
        return logits.amax(-2)[..., 2:17] if reduction == "max" else torch.softmax(logits, -1).mean(-2)[..., 2:17]

    torch.testing.assert_close(torch_scores, scores(grouped), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(native_scores, scores(as_scored), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key_dtype", ["float32", "bfloat16", "int8"])
def test_one_query_head_per_kv_group_ranks_by_its_logits(key_dtype):
    """A predictor of one query head per KV head: its scores are its logits over the candidates (the mean
    rule's one softmax ranks alike), said to wrappers as "logit" scores; critical(...) over it re-weights them."""
    adapter = ModelAdapter(tiny_model("qwen2", num_hidden_layers=4))
    kvh = adapter.dims.num_kv_heads
    assert adapter.dims.group_size > 1
    policy = bound_policy(adapter, query_heads=kvh, key_dtype=key_dtype)
    assert policy.by_max and policy.score_kind == "logit"
    assert not bound_policy(adapter).by_max and bound_policy(adapter).score_kind == "mass"
    predictor = policy.predictor
    tensors, _, k_new = prefilled_and_one_decode(policy, adapter)
    candidates = Candidates(lo=2, hi=17, keep=3, position=20)
    layers, scores = policy.plan(0, tensors[0][0][-1], candidates)
    queries = predictor.importance_queries(0, tensors[0][0][-1])  # [2, KvH, d']
    assert queries.shape[1] == kvh and scores.shape == (2, kvh, 15)
    for i, layer in enumerate(layers):
        keys = policy.cache.read(layer, 0, 21).float()  # as stored (int8 dequantised)
        scored = as_the_cpu_scores(queries[i].unsqueeze(0), predictor.config.dim, key_dtype)
        logits = predictor.head_scores(scored, keys)[:, 0]  # [KvH, 21]
        torch.testing.assert_close(scores[i], logits[:, 2:17], rtol=2e-2 if key_dtype == "bfloat16" else 1e-5,
                                   atol=1e-2 if key_dtype == "bfloat16" else 1e-5)
        ranked = torch.softmax(logits[:, :20], -1)[:, 2:17].topk(3).indices.sort().values
        assert torch.equal(scores[i].topk(3).indices.sort().values, ranked)
    critical = build_policy("critical(tokenbutler)", predictor=predictor)
    assert critical.base.score_kind == "logit"


def test_decode_queries_come_from_the_native_query_network_where_it_is_built(monkeypatch):
    """On the CPU with the native kernels, a float32 predictor's decode-step queries come from the kernel and
    equal the predictor's own, the last producer's (one consumer) too; weights replaced after bind are the
    ones used; without the kernels the torch path answers; a rotating predictor keeps the torch path."""
    from offload_engine import native

    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))  # producers 0 (layers 1-2) and 2 (layer 3)
    policy = bound_policy(adapter)
    if native.kernels() is None:
        assert policy._native_mlps == {}
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    assert sorted(policy._native_mlps) == [0, 2]
    predictor = policy.predictor
    with torch.no_grad():  # a norm that is not the identity, so its weight and bias are tested too
        for network in predictor.queries:
            network[0].weight.normal_(1.0, 0.5)
            network[0].bias.normal_(0.0, 0.5)
    x = torch.randn(adapter.dims.hidden_size) * 3
    for producer, consumers in ((0, 2), (2, 1)):
        got = policy._importance_queries(producer, x, 7)
        assert got.shape == (consumers, adapter.dims.num_heads, 8)
        torch.testing.assert_close(got, predictor.importance_queries(producer, x, 7), rtol=1e-4, atol=1e-5)
    replacement = {name: torch.randn_like(value) for name, value in predictor.state_dict().items()}
    predictor.load_state_dict(replacement, assign=True)  # new parameter tensors after bind
    torch.testing.assert_close(policy._importance_queries(0, x, 7), predictor.importance_queries(0, x, 7),
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the same parameter given new memory (the bound kernel call would read the old one)
        predictor.queries[0][1].weight.data = torch.randn_like(predictor.queries[0][1].weight) * 2
    torch.testing.assert_close(policy._importance_queries(0, x, 7), predictor.importance_queries(0, x, 7),
                               rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("TBRUN_NATIVE", "0")  # kernels switched off after bind: the predictor answers
    native.reset()
    try:
        torch.testing.assert_close(policy._importance_queries(0, x, 7), predictor.importance_queries(0, x, 7))
    finally:
        monkeypatch.delenv("TBRUN_NATIVE")
        native.reset()
    assert bound_policy(adapter, rope_pairs=2)._native_mlps == {}


@pytest.mark.parametrize("stored, share", [("int8", 0.35), ("bfloat16", 0.51)])
def test_rounded_projected_keys_keep_the_ranking(stored, share):
    """int8 (+ a float16 scale per token) and bfloat16 keys rank nearly as float32 ones, in a fraction
    of the bytes."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    exact, int8 = bound_policy(adapter, key_dtype="float32"), bound_policy(adapter, key_dtype=stored)
    tensors = prompt_tensors(adapter, 40)
    for policy in (exact, int8):
        for layer, (x, q, k, v) in enumerate(tensors):
            policy.observe_prefill(layer, x, q, k, v)
    candidates = Candidates(lo=0, hi=40, keep=8, position=40)
    a, b = exact.plan(0, tensors[0][0][-1], candidates)[1], int8.plan(0, tensors[0][0][-1], candidates)[1]
    torch.testing.assert_close(a[1], b[1], atol=0.05, rtol=0.05)
    top_a, top_b = a[1].topk(8).indices, b[1].topk(8).indices
    overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b)) / top_a.numel()
    assert overlap >= 0.85
    assert int8.cache.nbytes < share * exact.cache.nbytes


def test_predictor_for_another_model_is_refused_at_bind():
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    other = ModelAdapter(tiny_model("llama", num_hidden_layers=3))
    policy = TokenButlerPolicy(predictor=predictor_for(other))
    with pytest.raises(PredictorError, match="3 layers.*4 layers"):
        policy.bind(PolicyContext(dims=adapter.dims, capacity=32, device=torch.device("cpu"), dtype=torch.float32,
                                  adapter=adapter, host_store=None, sinks=2, window=4))


def test_loads_a_checkpoint_by_path_and_finds_shipped_predictors(tmp_path):
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    save_checkpoint(tmp_path / "p", predictor_for(adapter, seed=3))
    policy = TokenButlerPolicy(predictor_path=str(tmp_path / "p"))
    policy.bind(PolicyContext(dims=adapter.dims, capacity=32, device=torch.device("cpu"), dtype=torch.float32,
                              adapter=adapter, host_store=None, sinks=2, window=4))
    assert torch.equal(policy.predictor.key_proj, predictor_for(adapter, seed=3).key_proj)
    with pytest.raises(PredictorError, match="needs a predictor for this model"):
        TokenButlerPolicy().bind(PolicyContext(dims=adapter.dims, capacity=32, device=torch.device("cpu"),
                                               dtype=torch.float32, adapter=adapter, host_store=None, sinks=2, window=4))
    embedded = SimpleNamespace(config=SimpleNamespace(_name_or_path="/home/u/.cache/tbrun/models/SmolLM2-135M-Instruct"))
    assert shipped_predictor_for(embedded).name == "smollm2-135m-instruct"
    # a predictor trained for the interval wins where one is shipped (generate, serve, eval, the overhead
    # bench and the vLLM plugin all load through here); other intervals and models keep the default
    assert shipped_predictor_for(embedded, 4).name == "smollm2-135m-instruct-interval4"
    assert shipped_predictor_for(embedded, 1).name == shipped_predictor_for(embedded, 2).name == "smollm2-135m-instruct"
    other = SimpleNamespace(config=SimpleNamespace(_name_or_path="meta-llama/Llama-3.1-8B"))
    assert shipped_predictor_for(other, 4) is None


def test_a_short_context_takes_the_predictor_fine_tuned_for_it_at_interval_1_only(monkeypatch, tmp_path):
    """At interval 1 a cache of at most SHORT_CONTEXT_TOKENS takes the short-context predictor where it is
    shipped; a longer or unknown one, or interval 4, does not; without the folder the default one."""
    from offload_engine.policies.tokenbutler import SHIPPED_FOR_SHORT_CONTEXT, SHORT_CONTEXT_TOKENS

    embedded = SimpleNamespace(config=SimpleNamespace(_name_or_path="/cache/tbrun/models/SmolLM2-135M-Instruct"))
    longest, short = SHIPPED_FOR_SHORT_CONTEXT["smollm2-135m-instruct"]
    assert longest == SHORT_CONTEXT_TOKENS
    assert shipped_predictor_for(embedded, 1, longest).name == short
    assert shipped_predictor_for(embedded, 1, 256).name == short
    assert shipped_predictor_for(embedded, 1, longest + 1).name == "smollm2-135m-instruct"
    assert shipped_predictor_for(embedded, 1).name == "smollm2-135m-instruct"  # context unknown
    assert shipped_predictor_for(embedded, 4, longest).name == "smollm2-135m-instruct-interval4"
    assert shipped_predictor_for(embedded, 2, longest).name == "smollm2-135m-instruct"
    for folder in ("smollm2-135m-instruct", "smollm2-135m-instruct-interval4"):  # a shipped set without it
        (tmp_path / folder).mkdir()
    monkeypatch.setenv("TBRUN_PREDICTORS", str(tmp_path))
    assert shipped_predictor_for(embedded, 1, longest).name == "smollm2-135m-instruct"


def test_the_policy_loads_the_short_context_predictor_for_a_short_cache(monkeypatch, tmp_path):
    """bind() asks for the predictor of its own capacity: a cache of SHORT_CONTEXT_TOKENS or fewer loads the
    short-context folder, a longer one the default (shipped folders of a tiny model's shape)."""
    from offload_engine.policies import tokenbutler
    from offload_engine.policies.tokenbutler import SHIPPED_FOR_SHORT_CONTEXT, SHORT_CONTEXT_TOKENS

    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    adapter.config._name_or_path = "/models/SmolLM2-135M-Instruct"
    _, short = SHIPPED_FOR_SHORT_CONTEXT["smollm2-135m-instruct"]
    save_checkpoint(tmp_path / "smollm2-135m-instruct", predictor_for(adapter, seed=1))
    save_checkpoint(tmp_path / short, predictor_for(adapter, seed=2))
    monkeypatch.setenv("TBRUN_PREDICTORS", str(tmp_path))
    loads = []
    original = tokenbutler.load_checkpoint
    monkeypatch.setattr(tokenbutler, "load_checkpoint", lambda path, *a: loads.append(Path(path).name) or original(path, *a))
    for capacity in (SHORT_CONTEXT_TOKENS, SHORT_CONTEXT_TOKENS + 1):
        policy = TokenButlerPolicy()
        policy.bind(PolicyContext(dims=adapter.dims, capacity=capacity, device=torch.device("cpu"),
                                  dtype=torch.float32, adapter=adapter, host_store=None, sinks=2, window=4))
    assert loads == [short, "smollm2-135m-instruct"]
    assert torch.equal(policy.predictor.key_proj, predictor_for(adapter, seed=1).key_proj)


def test_a_predictor_that_rotates_by_position_caches_turned_keys_and_turns_its_queries():
    """rope_pairs: the compact cache holds each key turned by its own position (prefill and decode),
    the producer's queries are turned by the decoded token's position, and the scores are those of
    the predictor computed offline at the same positions."""
    adapter = ModelAdapter(tiny_model("qwen2", num_hidden_layers=4))
    policy = bound_policy(adapter, rope_pairs=2, key_dtype="float32")  # the exact keys, to compare them
    predictor = policy.predictor
    tensors, x_new, k_new = prefilled_and_one_decode(policy, adapter)
    turned = predictor.project_keys(3, tensors[3][2], torch.arange(20))
    assert not torch.allclose(turned, predictor.project_unrotated(3, tensors[3][2]))  # the rotation is real
    torch.testing.assert_close(policy.cache.read(3, 0, 20), turned)
    torch.testing.assert_close(policy.cache.read(3, 20, 21), predictor.project_keys(3, k_new.unsqueeze(1), 20))
    candidates = Candidates(lo=2, hi=17, keep=3, position=20)
    layers, scores = policy.plan(0, x_new, candidates)
    queries = predictor.importance_queries(0, x_new, torch.tensor(20))  # [2, H, d']
    keys = torch.cat([predictor.project_keys(1, tensors[1][2], 0), predictor.project_keys(1, k_new.unsqueeze(1), 20)], 1)
    heads = predictor.head_scores(queries[0].unsqueeze(0), keys)[:, 0]  # [H, 21]
    expected = torch.softmax(heads[:, :20], -1).view(2, 2, 20).mean(1)[:, 2:17]
    torch.testing.assert_close(scores[0], expected)


def test_decode_keys_use_the_steps_folded_projection_and_follow_a_changed_predictor():
    """A decode step's keys go through one projection per step with the rotation folded in: the same keys as
    project_keys at that position, at every layer and at a far position; changing the predictor's projection
    in place (training) or moving on a position is seen at the next write."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    policy = bound_policy(adapter, capacity=100_010, rope_pairs=2, key_dtype="float32")
    predictor = policy.predictor
    k = torch.randn(adapter.dims.num_kv_heads, adapter.dims.head_dim)
    for position in (5, 100_000):
        for layer in range(1, 4):
            policy.observe_decode(layer, position, None, None, k, None)
            torch.testing.assert_close(policy.cache.read(layer, position, position + 1),
                                       predictor.project_keys(layer, k.unsqueeze(1), position))
    with torch.no_grad():
        predictor.key_proj.mul_(2.0)
    policy.observe_decode(2, 100_000, None, None, k, None)
    torch.testing.assert_close(policy.cache.read(2, 100_000, 100_001),
                               predictor.project_keys(2, k.unsqueeze(1), 100_000))


@pytest.mark.parametrize("key_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("rope_pairs", [0, 2])
def test_decode_keys_are_written_by_one_native_call_a_layer_where_the_kernels_are_built(key_dtype, rope_pairs,
                                                                                        monkeypatch):
    """On the CPU a decode key goes through its layer's projection into the compact cache in one native call
    (BoundKeyWriter), bound once while the step's projections are the same memory (every step, without a
    rotation): the keys torch's path writes (float32 to rounding, bfloat16 to one ulp, int8 codes to one step
    with their scales) at every layer and step."""
    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=4))
    writes, binds = [], []
    call, bind = native.BoundKeyWriter.__call__, native.SelectionKernels.bind_key_writer
    monkeypatch.setattr(native.BoundKeyWriter, "__call__", lambda self, *a: writes.append(call(self, *a)) or writes[-1])
    monkeypatch.setattr(native.SelectionKernels, "bind_key_writer", lambda self, *a: binds.append(1) or bind(self, *a))
    policy = bound_policy(adapter, capacity=40, rope_pairs=rope_pairs, key_dtype=key_dtype)
    reference = bound_policy(adapter, capacity=40, rope_pairs=rope_pairs, key_dtype=key_dtype)
    reference.predictor.load_state_dict(policy.predictor.state_dict())
    reference._projections_at = lambda position: (reference.predictor.key_projections_at(position), None)  # torch's
    generator = torch.Generator().manual_seed(7)
    steps = range(9, 14)
    for position in steps:
        # the model's keys: a view of its [KvH, D] rows inside a wider tensor (rows not contiguous)
        k = torch.randn(adapter.dims.num_kv_heads, adapter.dims.head_dim + 3, generator=generator)[:, 3:]
        with torch.inference_mode():
            for layer in range(4):
                policy.observe_decode(layer, position, None, None, k, None)
                reference.observe_decode(layer, position, None, None, k, None)
    assert len(writes) == 3 * len(steps) and all(writes)  # each written by the kernel, none left to torch
    assert len(binds) == (len(steps) if rope_pairs else 1)
    decoded = slice(steps[0], steps[-1] + 1)
    if key_dtype == "int8":  # codes within one of torch's (the sums' order differs), scales to float16 rounding
        assert (policy.cache.keys[..., decoded].int() - reference.cache.keys[..., decoded].int()).abs().max() <= 1
        torch.testing.assert_close(policy.cache.scales[..., decoded].float(),
                                   reference.cache.scales[..., decoded].float(), rtol=1e-3, atol=0.0)
        tolerance = {"rtol": 0.0, "atol": float(reference.cache.scales.float().max()) * 1.01}  # one code step
    else:
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if key_dtype == "float32" else {"rtol": 2 ** -7, "atol": 1e-6}
    for layer in range(1, 4):
        torch.testing.assert_close(policy.cache.read(layer, steps[0], steps[-1] + 1).float(),
                                   reference.cache.read(layer, steps[0], steps[-1] + 1).float(), **tolerance)
    assert policy.cache.read(1, 0, steps[0]).abs().sum() == 0  # nothing written outside the positions decoded


@pytest.mark.parametrize("key_dtype", ["bfloat16", "int8"])
def test_decode_keys_are_written_as_the_cache_stores_them_even_under_inference_mode(key_dtype):
    """A predictor made under torch.inference_mode (its tensors count no versions) decodes; each decode key
    is stored as the prefill's keys are (rounded to bfloat16, or int8 codes and a scale)."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=3))
    with torch.inference_mode():
        policy = bound_policy(adapter, rope_pairs=2, key_dtype=key_dtype)
        k = torch.randn(adapter.dims.num_kv_heads, adapter.dims.head_dim, generator=torch.Generator().manual_seed(3))
        policy.observe_decode(1, 9, None, None, k, None)
        policy.observe_decode(2, 9, None, None, k, None)
    reference = bound_policy(adapter, rope_pairs=2, key_dtype=key_dtype)
    reference.predictor.load_state_dict(policy.predictor.state_dict())
    for layer in (1, 2):
        reference.observe_extend(layer, 9, None, None, k.unsqueeze(1), None)
        expected = reference.cache.read(layer, 9, 10).float()
        # the folded projection rounds differently: one bfloat16 ulp, or one int8 step of the token's scale
        step = float(reference.cache.scales[layer - 1, :, 9].float().max()) if key_dtype == "int8" else 0.0
        torch.testing.assert_close(policy.cache.read(layer, 9, 10).float(), expected, rtol=1e-2, atol=1e-3 + 1.01 * step)


def test_rotated_scores_depend_only_on_the_distance_between_query_and_key():
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=3))
    predictor = predictor_for(adapter, rope_pairs=3)
    x, k = torch.randn(adapter.dims.hidden_size), torch.randn(adapter.dims.num_kv_heads, 9, adapter.dims.head_dim)

    def scores(query_position: int, first_key: int) -> torch.Tensor:
        queries = predictor.importance_queries(0, x, query_position)[0]  # [H, d']
        return predictor.head_scores(queries.unsqueeze(0), predictor.project_keys(1, k, first_key))

    torch.testing.assert_close(scores(30, 10), scores(5030, 5010), rtol=1e-4, atol=1e-4)  # same distances
    assert not torch.allclose(scores(30, 10), scores(30, 20), atol=1e-3)  # other distances, other scores
    unturned = predictor.project_unrotated(1, k)  # what a paged cache keeps: turned by t - p when scored
    distance = torch.arange(10, 19) - 30
    relative = predictor.head_scores(predictor.importance_queries(0, x, 0)[0].unsqueeze(0),
                                     predictor.rotate(unturned, distance))
    torch.testing.assert_close(relative, scores(30, 10), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pass the tokens' positions"):
        predictor.project_keys(1, k)


def test_rotating_predictors_decode_exactly_like_dense_at_full_budget():
    model = tiny_model("llama", num_hidden_layers=5)
    prompt = torch.randint(0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(7))
    adapter = ModelAdapter(model)
    selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=14), sinks=2, window=4)
    config = EngineConfig(context=37 + NEW_TOKENS + 3, mode=KVMode.SPARSE_OFFLOAD, selection=selection, prefill_chunk=16)
    small = Engine(adapter, config, policy=TokenButlerPolicy(predictor=predictor_for(adapter, rope_pairs=2)))
    assert len(small.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids) == NEW_TOKENS
    full = EngineConfig(context=37 + NEW_TOKENS + 3, mode=KVMode.SPARSE_OFFLOAD, prefill_chunk=16,
                        selection=SelectionConfig(policy="tokenbutler", budget=Budget(tokens=48), sinks=2, window=4))
    engine = Engine(adapter, full, policy=TokenButlerPolicy(predictor=predictor_for(adapter, rope_pairs=2)))
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids == reference_ids(model, prompt)


# ------------------------------------------------------------------------------------ engine
def reference_ids(model, prompt: torch.Tensor) -> list[int]:
    out = model.generate(prompt[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def tokenbutler_engine(adapter, prompt_len: int, budget: int, interval: int = 1, neighbors: int = 0) -> Engine:
    selection = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=budget), sinks=2, window=4,
                                interval=interval, neighbors=neighbors)
    config = EngineConfig(context=prompt_len + NEW_TOKENS + 3, mode=KVMode.SPARSE_OFFLOAD, selection=selection,
                          prefill_chunk=16)
    return Engine(adapter, config, policy=TokenButlerPolicy(predictor=predictor_for(adapter)))


@pytest.mark.parametrize("arch, kv_heads", [("llama", 4), ("qwen2", 2)])
def test_budget_covering_every_token_decodes_exactly_like_dense(arch, kv_heads):
    model = tiny_model(arch, num_hidden_layers=5, num_key_value_heads=kv_heads)
    prompt = torch.randint(0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(7))
    engine = tokenbutler_engine(ModelAdapter(model), 37, budget=37 + NEW_TOKENS + 3)
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)).token_ids == reference_ids(model, prompt)


def test_interval_predicts_every_n_steps_and_small_budgets_run(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=5)
    adapter = ModelAdapter(model)
    prompt = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(8))
    calls = []
    original = TokenButlerPolicy.plan
    monkeypatch.setattr(TokenButlerPolicy, "plan",
                        lambda self, layer, *a, **k: calls.append(layer) or original(self, layer, *a, **k))
    engine = tokenbutler_engine(adapter, 50, budget=12, interval=3, neighbors=1)
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert len(result.token_ids) == NEW_TOKENS
    steps = NEW_TOKENS - 1  # the first token comes from the prefill
    assert calls == [0, 2] * len(range(0, steps, 3))  # producers 0 and 2, on steps 0, 3 and 6


def test_random_weights_give_a_predictor_of_the_models_shape_for_timing():
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=5))
    policy = build_policy("tokenbutler", random_weights=True)
    policy.bind(PolicyContext(dims=adapter.dims, capacity=32, device=torch.device("cpu"), dtype=torch.float32,
                              adapter=adapter, host_store=None, sinks=2, window=4))
    assert policy.predictor.config.producer_every == 4 and policy.predictor.config.dim == 16
    assert [layer for layer in range(5) if policy.is_producer(layer)] == [0]


def test_rotation_stays_exact_when_the_predictor_takes_the_models_dtype():
    """vLLM casts the predictor to the model's dtype: the rotation's frequencies must stay float64."""
    adapter = ModelAdapter(tiny_model("llama", num_hidden_layers=3))
    predictor = predictor_for(adapter, rope_pairs=3)
    x = torch.randn(adapter.dims.hidden_size)
    half = predictor.to(torch.bfloat16)
    got = half.importance_queries(0, x.to(torch.bfloat16), 7000).float()
    unturned = half.importance_queries(0, x.to(torch.bfloat16), 0).float()
    assert half._frequencies.dtype == torch.float64
    torch.testing.assert_close(got, predictor.float().rotate(unturned, 7000), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_group_mean_probabilities_is_the_mean_of_the_heads_softmaxes(group):
    from offload_engine.selection.scores import group_mean_probabilities

    logits = 4 * torch.randn(2, 3, group, 50, generator=torch.Generator().manual_seed(group))
    before = logits.clone()
    weights = (logits.double() - logits.double().amax(dim=-1, keepdim=True)).exp()  # in float64, by hand
    expected = (weights / weights.sum(dim=-1, keepdim=True)).sum(dim=-2) / group
    mean = group_mean_probabilities(logits)
    assert mean.shape == (2, 3, 50) and torch.allclose(mean.double(), expected, atol=1e-7, rtol=1e-5)
    assert torch.allclose(mean.sum(dim=-1), torch.ones(2, 3))  # still a distribution over the tokens
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_every_shipped_interval_predictor_was_trained_for_its_interval_and_fits_the_default_ones_model():
    """SHIPPED_FOR_INTERVAL names folders that exist, whose training looked ahead by that interval
    (``--lookahead``), for the same model shape as the model's default predictor."""
    from offload_engine.policies.tokenbutler import SHIPPED, SHIPPED_FOR_INTERVAL, shipped_predictors_dir

    for model, by_interval in SHIPPED_FOR_INTERVAL.items():
        _, default = load_checkpoint(shipped_predictors_dir() / SHIPPED[model])
        for interval, folder in by_interval.items():
            _, config = load_checkpoint(shipped_predictors_dir() / folder)
            assert config["train"]["lookahead"] == interval > 1
            assert config["model_shape"] == default["model_shape"]
            assert config["model_name"] == default["model_name"]


def test_every_shipped_short_context_predictor_was_trained_on_sequences_as_short_and_fits_the_default_ones_model():
    """SHIPPED_FOR_SHORT_CONTEXT names folders that exist, trained (lookahead 1) on sequences no longer than
    the longest context they are taken for, for the same model shape as the model's default predictor."""
    from offload_engine.policies.tokenbutler import SHIPPED, SHIPPED_FOR_SHORT_CONTEXT, shipped_predictors_dir

    for model, (longest, folder) in SHIPPED_FOR_SHORT_CONTEXT.items():
        _, default = load_checkpoint(shipped_predictors_dir() / SHIPPED[model])
        _, config = load_checkpoint(shipped_predictors_dir() / folder)
        assert config["train"]["lookahead"] == 1 and config["train"]["seq_len"] <= longest
        assert config["model_shape"] == default["model_shape"]
        assert config["model_name"] == default["model_name"]
