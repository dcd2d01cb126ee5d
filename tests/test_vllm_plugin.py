"""tbrun's selection inside vLLM (offload_engine/integrations/vllm).

The first part runs everywhere (no vLLM): ``TBRUN_VLLM`` parsing, the plugin hook when unset or
wrong, the predictor check, and the paged selection math against tbrun's own policies on
contiguous KV. The second part needs the ``vllm`` extra (vLLM's CPU build) and shares one engine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from offload_engine.config import Budget, SelectionConfig
from offload_engine.errors import ConfigError
from offload_engine.integrations.vllm import paged
from offload_engine.integrations.vllm.config import parse_config, supported_policies
from offload_engine.models import ModelDims
from offload_engine.policies.base import Candidates, PolicyContext
from offload_engine.policies.critical import value_norms
from offload_engine.policies.quest import page_bounds, page_scores
from offload_engine.policies.tokenbutler import TokenButlerPolicy
from offload_engine.predictor.checkpoint import load_checkpoint, save_checkpoint
from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
from offload_engine.selection import Selector

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PREDICTOR = REPO / "predictors" / "smollm2-135m-instruct"


# -- TBRUN_VLLM ------------------------------------------------------------------------------------
def test_unset_or_empty_means_off():
    assert parse_config(None) is None
    assert parse_config("  ") is None


def test_examples_from_the_docs_parse():
    config = parse_config("policy=tokenbutler,budget=10%")
    assert (config.base, config.critical, config.selection.budget) == ("tokenbutler", False, Budget(fraction=0.1))
    config = parse_config("policy=critical(quest), budget=2048, sinks=8, window=32")
    assert (config.base, config.critical, config.policy) == ("quest", True, "critical(quest)")
    assert (config.selection.budget.tokens, config.selection.sinks, config.selection.window) == (2048, 8, 32)
    config = parse_config(f"policy=tokenbutler,budget=10%,interval=4,predictor={SHIPPED_PREDICTOR}")
    assert (config.selection.interval, config.predictor) == (4, str(SHIPPED_PREDICTOR))
    assert parse_config("policy=dense").selection.budget is None


@pytest.mark.parametrize("text, words", [
    ("policy=h2o,budget=10%", ["h2o", "not supported", "tokenbutler"]),
    ("policy=critical(dense)", ["not supported"]),
    ("policy=bogus", ["bogus", "quest"]),
    ("budget=10%", ["names no policy"]),
    ("policy=quest,budget=0%", ["outside (0, 100%]"]),
    ("policy=quest,budget=150%", ["outside (0, 100%]"]),
    ("policy=quest,budget=lots", ["neither a token count"]),
    ("policy=quest,budget=16", ["exceed the budget", "narrowest window"]),
    ("policy=quest,colour=red", ["unknown key 'colour'"]),
    ("policy=quest,budget", ["not key=value"]),
    ("policy=quest,policy=dense", ["twice"]),
    ("policy=quest,window=many", ["window", "whole number"]),
    ("policy=quest,interval=4", ["interval", "tokenbutler only"]),
    ("policy=quest,predictor=/tmp", ["only used by policy=tokenbutler"]),
    ("policy=tokenbutler,predictor=/no/such/dir", ["not a directory"]),
])
def test_bad_configuration_is_one_clear_message(text, words):
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    message = str(error.value)
    assert message.startswith("TBRUN_VLLM") and "\n" not in message and "--" not in message
    for word in words:
        assert word in message


def test_supported_policies_are_listed():
    assert {"tokenbutler", "quest", "critical(quest)", "critical(tokenbutler)"} <= set(supported_policies())


def test_register_does_nothing_when_unset(monkeypatch):
    from offload_engine.integrations.vllm import register

    monkeypatch.delenv("TBRUN_VLLM", raising=False)
    before = "offload_engine.integrations.vllm.plugin" in sys.modules
    register()
    assert ("offload_engine.integrations.vllm.plugin" in sys.modules) == before  # vLLM not even imported


def test_register_stops_on_a_bad_value(monkeypatch):
    from offload_engine.integrations.vllm import register

    monkeypatch.setenv("TBRUN_VLLM", "policy=quest,budget=200%")
    with pytest.raises(ConfigError, match="TBRUN_VLLM"):
        register()


def fake_vllm_config(model: str, layers: int = 30, heads: int = 9, kv_heads: int = 3, hidden: int = 576,
                     max_model_len: int = 8192):
    hf = SimpleNamespace(head_dim=hidden // heads, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=49152)
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=model, max_model_len=max_model_len,
                                                               dtype=torch.float32))
    return vllm_config, hf


def test_a_predictor_for_another_model_is_refused_at_load():
    from offload_engine.integrations.vllm.plugin import load_predictor

    config = parse_config(f"policy=tokenbutler,budget=10%,predictor={SHIPPED_PREDICTOR}")
    vllm_config, hf = fake_vllm_config("/models/Llama-3.2-1B", layers=16, heads=32, kv_heads=8, hidden=2048)
    with pytest.raises(ConfigError) as error:
        load_predictor(config, vllm_config, hf, num_layers=16)
    assert str(error.value).startswith("TBRUN_VLLM") and "train" in str(error.value)


@pytest.mark.parametrize("parallel,speculative,words", [
    (dict(tensor_parallel_size=2, pipeline_parallel_size=1), None, "parallelism"),
    (dict(tensor_parallel_size=1, pipeline_parallel_size=2), None, "parallelism"),  # each worker: its own layers
    (dict(tensor_parallel_size=1, pipeline_parallel_size=1), SimpleNamespace(method="eagle"), "speculative"),
])
def test_set_ups_the_plugin_cannot_select_in_are_refused_before_any_request(parallel, speculative, words):
    from offload_engine.integrations.vllm.plugin import refuse_unsupported_setup

    config = SimpleNamespace(parallel_config=SimpleNamespace(**parallel), speculative_config=speculative)
    with pytest.raises(ConfigError, match=f"TBRUN_VLLM: .*{words}"):
        refuse_unsupported_setup(config)
    refuse_unsupported_setup(SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=1,
                                                                             pipeline_parallel_size=1),
                                             speculative_config=None))


def test_the_shipped_predictor_is_found_by_model_name_and_a_missing_one_named():
    from offload_engine.integrations.vllm.plugin import load_predictor

    config = parse_config("policy=tokenbutler,budget=10%")
    predictor = load_predictor(config, *fake_vllm_config("/cache/SmolLM2-135M-Instruct/"), num_layers=30)
    assert predictor.config.num_layers == 30
    every_fourth = load_predictor(parse_config("policy=tokenbutler,budget=10%,interval=4"),
                                  *fake_vllm_config("/cache/SmolLM2-135M-Instruct/"), num_layers=30)
    assert not torch.equal(every_fourth.key_proj, predictor.key_proj)  # the predictor trained for interval 4
    short = load_predictor(config, *fake_vllm_config("/cache/SmolLM2-135M-Instruct/", max_model_len=1024), num_layers=30)
    shipped_short, _ = load_checkpoint(REPO / "predictors" / "smollm2-135m-instruct-1k")
    assert torch.equal(short.key_proj, shipped_short.key_proj)  # max_model_len 1024: the short-context one
    assert not torch.equal(short.key_proj, predictor.key_proj)
    with pytest.raises(ConfigError, match="predictor=DIR"):
        load_predictor(config, *fake_vllm_config("/models/Unknown-7B"), num_layers=30)


# -- paged selection against contiguous references -------------------------------------------------
KV_HEADS, HEADS, DIM, BLOCK = 2, 4, 8, 8


def paged_sequences(lengths, seed=0, blocks=40, transposed=False):
    """Random K/V for sequences of ``lengths`` in shuffled blocks: (kv_cache views, block_table, contiguous K/V)."""
    generator = torch.Generator().manual_seed(seed)
    key_cache = torch.zeros(blocks, KV_HEADS, BLOCK, DIM)
    value_cache = torch.zeros(blocks, KV_HEADS, BLOCK, DIM)
    order = torch.randperm(blocks, generator=generator)
    most = -(-max(lengths) // BLOCK)
    table = order[: len(lengths) * most].view(len(lengths), most)
    contiguous = []
    for b, length in enumerate(lengths):
        k = torch.randn(length, KV_HEADS, DIM, generator=generator)
        v = torch.randn(length, KV_HEADS, DIM, generator=generator)
        positions = torch.arange(length)
        slots = table[b, positions // BLOCK] * BLOCK + positions % BLOCK
        write_paged(key_cache, k, slots, transposed)
        write_paged(value_cache, v, slots, False)
        contiguous.append((k, v, slots))
    return key_cache, value_cache, table, contiguous


def write_paged(cache, rows, slots, transposed):
    for row, slot in zip(rows, slots.tolist()):
        block, offset = divmod(slot, BLOCK)
        if transposed:
            paged.dim_major(cache)[block, :, :, offset] = row
        else:
            cache[block, :, offset] = row


def reference_attention(q, k, v, positions, scale):
    """q ``[H, D]``, k/v ``[T, KvH, D]``, positions ``[KvH, N]`` -> ``[H, D]`` (dense math on the chosen rows)."""
    out = torch.empty(HEADS, DIM)
    group = HEADS // KV_HEADS
    for h in range(HEADS):
        kv = h // group
        chosen = positions[kv][positions[kv] >= 0]
        weights = torch.softmax((k[chosen, kv] @ q[h]) * scale, dim=0)
        out[h] = weights @ v[chosen, kv]
    return out


def make_batch(lengths, table, selection=None):
    selector = Selector(selection or SelectionConfig(budget=None, sinks=2, window=4), capacity=256,
                        dense_layers=frozenset())
    return paged.decode_batch(torch.arange(len(lengths)), torch.tensor(lengths), table, BLOCK, selector)


@pytest.mark.parametrize("transposed", [False, True])
def test_every_position_equals_dense_attention_for_each_sequence(transposed):
    lengths = [5, 37, 20]
    key_cache, value_cache, table, contiguous = paged_sequences(lengths, transposed=transposed)
    batch = make_batch(lengths, table)
    for b, (_, _, slots) in enumerate(contiguous):
        assert batch.slots[b, : lengths[b]].tolist() == slots.tolist()
        assert (batch.slots[b, lengths[b]:] == -1).all()
    q = torch.randn(len(lengths), HEADS, DIM)
    out = paged.sparse_decode_attention(q, key_cache, value_cache, batch, paged.every_position(batch, KV_HEADS),
                                        0.3, keys_transposed=transposed)
    for b, (k, v, _) in enumerate(contiguous):
        every = torch.arange(lengths[b]).expand(KV_HEADS, -1)
        torch.testing.assert_close(out[b], reference_attention(q[b], k, v, every, 0.3))


@pytest.mark.parametrize("dim", [16, 8])  # the native kernel's head dims are multiples of 16; 8 is torch's
def test_sparse_attention_takes_the_native_kernel_where_it_applies_and_gives_the_batched_matmuls(dim, monkeypatch):
    """On the CPU each sequence of a batch attends through the engine's native decode attention where it is
    built and takes the shape, with the output of the batched matmuls (the path where it does not)."""
    from recording import record_results
    from offload_engine import native

    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    lengths = [29, 7]
    generator = torch.Generator().manual_seed(5)
    blocks = 8
    key_cache = torch.randn(blocks, KV_HEADS, BLOCK, dim, generator=generator)
    value_cache = torch.randn(blocks, KV_HEADS, BLOCK, dim, generator=generator)
    table = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7]])
    batch = make_batch(lengths, table)
    q = torch.randn(len(lengths), HEADS, dim, generator=generator)
    positions = paged.every_position(batch, KV_HEADS)
    calls = record_results(monkeypatch, native.SelectionKernels, "decode_attention")
    out = paged.sparse_decode_attention(q, key_cache, value_cache, batch, positions, 0.3)
    # a shape the kernel does not take is tried on the first sequence only (the others have the same shape)
    assert calls == ([True] * len(lengths) if dim % 16 == 0 else [False])
    monkeypatch.setattr(native.SelectionKernels, "decode_attention", lambda self, *args: None)
    torch.testing.assert_close(out, paged.sparse_decode_attention(q, key_cache, value_cache, batch, positions, 0.3))


def test_selection_keeps_sinks_window_and_each_sequences_own_budget():
    lengths = [40, 12, 33]
    _, _, table, _ = paged_sequences(lengths)
    selection = SelectionConfig(budget=Budget(fraction=0.5), sinks=2, window=4)
    batch = make_batch(lengths, table, selection)
    scores = torch.randn(len(lengths), KV_HEADS, max(lengths))
    selected = paged.select_top(scores, batch)
    positions = paged.attended_positions(batch, selected)
    selector = Selector(selection, capacity=256, dense_layers=frozenset())
    for b, length in enumerate(lengths):
        c = selector.candidates(1, length - 1)
        for h in range(KV_HEADS):
            chosen = selected[b, h][selected[b, h] >= 0]
            assert len(chosen) == c.keep and ((chosen >= c.lo) & (chosen < c.hi)).all()
            best = torch.topk(scores[b, h, c.lo : c.hi], c.keep).indices + c.lo
            assert sorted(chosen.tolist()) == sorted(best.tolist())
            attended = positions[b, h][positions[b, h] >= 0]
            assert len(attended) == len(set(attended.tolist())) == selector.budget_tokens(length)
            assert set(range(2)) | set(range(max(2, length - 4), length)) <= set(attended.tolist())


def test_a_batch_selects_like_each_sequence_alone():
    lengths = [50, 23, 41]
    key_cache, value_cache, table, _ = paged_sequences(lengths, seed=3)
    selection = SelectionConfig(budget=Budget(tokens=16), sinks=2, window=4)
    # Seeded: a batch pads its rows to the longest, so its float sums may differ from a row's alone in
    # the last bit, and a query whose scores nearly tie at the cut could then select another token.
    # Unseeded, the query came from the global generator, whose state depends on the tests before.
    q = torch.randn(len(lengths), HEADS, DIM, generator=torch.Generator().manual_seed(11))
    scorer = paged.QuestScorer(scale=0.3, page_size=4)
    for layer in (0,):
        for b, length in enumerate(lengths):
            positions = torch.arange(length)
            slots = table[b, positions // BLOCK] * BLOCK + positions % BLOCK
            keys = paged.gather_paged(key_cache, slots.view(1, 1, -1).expand(1, KV_HEADS, -1))[0].transpose(0, 1)
            scorer.write(layer, keys, keys, slots, key_cache.shape[0] * BLOCK)

    def run(rows):
        batch = make_batch([lengths[r] for r in rows], table[rows], selection)
        selected = paged.select_top(scorer.score(0, q[rows], batch), batch)
        return paged.sparse_decode_attention(q[rows], key_cache, value_cache, batch,
                                             paged.attended_positions(batch, selected), 0.3)

    together = run([0, 1, 2])
    for b in range(3):
        torch.testing.assert_close(together[b], run([b])[0])


def test_quest_page_bounds_by_slot_equal_the_policys_on_contiguous_keys():
    lengths = [45, 30]
    key_cache, _, table, contiguous = paged_sequences(lengths, seed=1)
    scorer = paged.QuestScorer(scale=0.5, page_size=4)
    for k, _, slots in contiguous:  # written in two chunks, like chunked prefill then decode
        scorer.write(3, k[:13], k[:13], slots[:13], key_cache.shape[0] * BLOCK)
        scorer.write(3, k[13:], k[13:], slots[13:], key_cache.shape[0] * BLOCK)
    batch = make_batch(lengths, table)
    q = torch.randn(len(lengths), HEADS, DIM)
    scores = scorer.score(3, q, batch)
    for b, (k, _, _) in enumerate(contiguous):
        low, high = page_bounds(k.transpose(0, 1), 0, 4)
        pages = page_scores(q[b], low, high) * 0.5
        expected = pages[:, torch.arange(lengths[b]) // 4]
        torch.testing.assert_close(scores[b, :, : lengths[b]], expected)


def test_quest_resets_a_reused_page():
    scorer = paged.QuestScorer(scale=1.0, page_size=4)
    big = torch.full((4, 1, 2), 100.0)
    scorer.write(0, big, big, torch.arange(4), 8)
    small = torch.ones(2, 1, 2)
    scorer.write(0, small, small, torch.arange(2), 8)  # the block was freed and handed to a new sequence
    assert scorer.high.tensors[0][0].max() == 1.0


def tiny_dims(layers=5):
    return ModelDims(num_layers=layers, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, hidden_size=16,
                     max_positions=256, vocab_size=10)


@pytest.mark.parametrize("rope_pairs, query_heads", [(0, None), (2, None), (0, KV_HEADS)])
def test_tokenbutler_scores_by_slot_equal_the_policys(rope_pairs, query_heads):
    """rope_pairs: the paged cache keeps keys unturned and turns them by their distance to the query
    when it scores; the policy turns keys and query by absolute position. The same scores. One query
    head per KV head: the policy ranks its logits, the paged scorer their softmax: the same top-k."""
    torch.manual_seed(0)
    dims = tiny_dims()
    predictor = TokenButlerPredictor(PredictorConfig.for_model(dims, producer_every=2, dim=4, hidden=8,
                                                               rope_pairs=rope_pairs, query_heads=query_heads)).eval()
    length = 30
    key_cache, _, table, contiguous = paged_sequences([length], seed=2)
    k, v, slots = contiguous[0]
    x = torch.randn(16)
    policy = TokenButlerPolicy(predictor=predictor, key_dtype="float32")  # the paged scorer keeps float32 keys
    policy.bind(PolicyContext(dims=dims, capacity=64, device=torch.device("cpu"), dtype=torch.float32,
                              adapter=None, host_store=None, sinks=2, window=4))
    batch = make_batch([length], table)
    scorer = paged.TokenButlerScorer(predictor, lambda producer, b: x.view(1, -1))
    for layer in range(dims.num_layers):
        policy.observe_prefill(layer, None, None, k.transpose(0, 1), v.transpose(0, 1))
        scorer.write(layer, k, v, slots, key_cache.shape[0] * BLOCK)
    candidates = Candidates(lo=2, hi=length - 3, keep=5, position=length - 1)
    layers, expected = policy.plan(2, x, candidates)  # producer 2 serves layers 3 and 4
    for row, layer in enumerate(layers):
        got = scorer.score(layer, torch.zeros(1, HEADS, DIM), batch)[0, :, candidates.lo : candidates.hi]
        if query_heads is None:
            torch.testing.assert_close(got, expected[row])
        else:
            assert policy.score_kind == "logit"
            assert torch.equal(got.topk(5).indices.sort().values, expected[row].topk(5).indices.sort().values)
            torch.testing.assert_close(got / got.sum(-1, keepdim=True), torch.softmax(expected[row], -1))


def test_critical_value_norms_by_slot_and_its_two_stages():
    torch.manual_seed(0)
    w_o = torch.randn(HEADS, DIM, 16)
    lengths = [26, 18]
    key_cache, _, table, contiguous = paged_sequences(lengths, seed=4)
    scorer = paged.CriticalScorer(paged.QuestScorer(scale=0.3, page_size=4), lambda layer: w_o, alpha=0.5)
    for k, v, slots in contiguous:
        scorer.write(1, k, v, slots, key_cache.shape[0] * BLOCK)
    for b, (k, v, slots) in enumerate(contiguous):
        torch.testing.assert_close(scorer.norms.tensors[1][slots].T, value_norms(v.transpose(0, 1), w_o))
    batch = make_batch(lengths, table, SelectionConfig(budget=Budget(tokens=14), sinks=2, window=4))
    q = torch.randn(2, HEADS, DIM)
    scores = scorer.score(1, q, batch)
    assert torch.isneginf(scores[~batch.candidate.unsqueeze(1).expand_as(scores)]).all()
    base_top = paged.select_top(scorer.base.score(1, q, batch), batch)
    assert not torch.equal(paged.select_top(scores, batch).sort(-1).values, base_top.sort(-1).values)
    scorer.alpha = 1.0  # the first stage is the base's whole top-k: the same selection
    assert torch.equal(paged.select_top(scorer.score(1, q, batch), batch).sort(-1).values, base_top.sort(-1).values)


# -- inside vLLM (CPU build) -----------------------------------------------------------------------
def _vllm():
    return pytest.importorskip("vllm", reason="vLLM's CPU build is not installed: pip install 'tbrun[vllm]' in its own venv")


def random_predictor(seen: list):
    """A ``SelectionReuse`` predict callback: random scores' top-k for each sub-batch, which it records."""
    def predict(part):
        seen.append(part)
        return paged.select_top(torch.randn(part.size, KV_HEADS, part.slots.shape[1]), part)
    return predict


def test_interval_reuses_each_sequences_selection_between_predictions():
    lengths = [40, 30]
    _, _, table, _ = paged_sequences([48, 48], seed=5)  # room to grow
    selection = SelectionConfig(budget=Budget(tokens=16), sinks=2, window=4, interval=3)
    reuse = paged.SelectionReuse(selection.interval)
    seen = []
    predict = random_predictor(seen)

    chosen = []
    for step in range(4):  # both sequences grow by one token per step
        batch = make_batch([n + step for n in lengths], table, selection)
        reuse.next_step()
        chosen.append(reuse.select(7, batch, predict))
    assert [part.size for part in seen] == [2, 2]  # predicted at steps 0 and 3 (interval 3), reused at 1 and 2
    assert torch.equal(chosen[1], chosen[0]) or (chosen[1] == -1).sum() >= (chosen[0] == -1).sum()
    kept = chosen[0][chosen[0] >= 0]
    assert set(chosen[2][chosen[2] >= 0].tolist()) <= set(kept.tolist())
    new_sequence = make_batch([12, 30 + 4], table, selection)  # row 0 has no selection kept: it predicts
    reuse.next_step()
    reuse.select(7, new_sequence, predict)
    assert seen[-1].size == 1


def test_a_selection_kept_steps_ago_is_never_reused():
    """Steps in which a layer selected nothing (every sequence fit its budget, or only prefills ran) leave
    its kept selections behind; by then their slots may be another sequence's: it predicts instead."""
    _, _, table, _ = paged_sequences([48], seed=5)
    selection = SelectionConfig(budget=Budget(tokens=16), sinks=2, window=4, interval=4)
    reuse = paged.SelectionReuse(selection.interval)
    seen = []
    predict = random_predictor(seen)

    reuse.next_step()
    reuse.select(7, make_batch([40], table, selection), predict)  # step 0 predicts, kept by position 39's slot
    reuse.next_step()
    reuse.select(7, make_batch([41], table, selection), predict)  # step 1 reuses it (the previous step's)
    assert [part.size for part in seen] == [1]
    for _ in range(2):
        reuse.next_step()  # steps 2 and 3: the layer selects nothing
    reuse.select(7, make_batch([42], table, selection), predict)  # position 40's slot, kept at step 1: stale
    assert [part.size for part in seen] == [1, 1]


@pytest.fixture(scope="module")
def engine():
    """One vLLM engine for the module, in this process, with the plugin on (tokenbutler at 10%).

    ``runtime.enabled = False`` gives vLLM's own attention from the same engine (same weights, same
    prefix cache), ``runtime.set_selection`` another budget: one engine start (~40 s) for every test.
    """
    vllm = _vllm()
    patch = pytest.MonkeyPatch()
    patch.setenv("TBRUN_VLLM", "policy=tokenbutler,budget=10%")
    patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: RUNTIME is reachable
    patch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    from offload_engine.integrations.vllm import plugin, register
    from offload_engine.models import embedded_model_dir
    from transformers import AutoTokenizer

    register()  # also when vLLM loaded its plugins before this module set TBRUN_VLLM
    model = str(embedded_model_dir())
    llm = vllm.LLM(model, dtype="float32", max_model_len=4096, enforce_eager=True, max_num_seqs=4, seed=0)
    yield SimpleNamespace(llm=llm, runtime=plugin.RUNTIME, tokenizer=AutoTokenizer.from_pretrained(model))
    plugin.RUNTIME = None
    patch.undo()


def generate(llm, prompts: list[list[int]], tokens: int) -> list[tuple[int, ...]]:
    from vllm import SamplingParams

    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=tokens), use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


def needle_prompts(tokenizer, count: int, context: int):
    from offload_engine.evaluation.tasks import niah_sample

    return [niah_sample(tokenizer, "single", i, count, context, 0) for i in range(count)]


@pytest.mark.slow
def test_full_budget_is_vllms_own_greedy_output(engine):
    from offload_engine.evaluation.prompts import chat_text, encode

    questions = ("What is the capital of France?", "Write a haiku about rain.", "Count from one to ten.")
    prompts = [encode(engine.tokenizer, chat_text(engine.tokenizer, q)) for q in questions]
    engine.runtime.enabled = False
    reference = generate(engine.llm, prompts, 24)
    engine.runtime.enabled = True
    engine.runtime.set_selection(SelectionConfig(budget=None))
    engine.runtime.own_dense_attention = True  # the plugin's paged attention over every token, not vLLM's kernel
    before = engine.runtime.decode_steps
    try:
        assert generate(engine.llm, prompts, 24) == reference
    finally:
        engine.runtime.own_dense_attention = False
    assert engine.runtime.decode_steps - before >= 23  # every decode step went through the plugin's attention


@pytest.mark.slow
def test_a_batch_of_four_gives_each_prompt_its_tokens_alone(engine):
    engine.runtime.enabled = True
    engine.runtime.set_selection(SelectionConfig(budget=Budget(fraction=0.1)))
    prompts = [list(s.prompt_ids) for s in needle_prompts(engine.tokenizer, 4, 1536)]
    prompts = [p[: 1200 + 97 * i] for i, p in enumerate(prompts)]  # four lengths, four budgets
    before = engine.runtime.selecting_steps
    together = generate(engine.llm, prompts, 12)
    assert engine.runtime.selecting_steps - before >= 11  # 10% of ~1.2k tokens: selection, not everything
    alone = [generate(engine.llm, [p], 12)[0] for p in prompts]
    assert together == alone


@pytest.mark.slow
def test_the_overhead_bench_times_each_of_vllms_decode_steps(engine):
    from tbrun_bench.overhead import VllmRunner

    engine.runtime.enabled = False  # vLLM's own attention, as the bench runs it
    prompt = list(needle_prompts(engine.tokenizer, 1, 1024)[0].prompt_ids)
    runner = VllmRunner("unused", 2048, new_tokens=6, enforce_eager=True, llm=engine.llm)
    assert runner.cores_used() is None  # nothing timed yet
    steps, prefill_s, ids = runner(prompt)
    assert len(ids) == 6 and len(steps) == 5  # one timed step per token after the first
    assert all(ms > 0 for ms in steps) and prefill_s > 0
    assert runner.wall_seconds * 1000 == pytest.approx(sum(steps)) and 0 < runner.cores_used() < 8
    reference = generate(engine.llm, [prompt], 6)[0]
    assert tuple(ids[: len(reference)]) == reference


@pytest.mark.slow
def test_tokenbutler_at_ten_percent_answers_a_needle_dense_answers(engine):
    samples = needle_prompts(engine.tokenizer, 4, 2048)
    prompts = [list(s.prompt_ids) for s in samples]

    def answered():
        outputs = generate(engine.llm, prompts, 32)
        texts = [engine.tokenizer.decode(ids) for ids in outputs]
        return [all(a in text for a in s.answers) for s, text in zip(samples, texts)], max(map(len, outputs))

    engine.runtime.enabled = False
    dense, _ = answered()
    engine.runtime.enabled = True
    engine.runtime.set_selection(SelectionConfig(budget=Budget(fraction=0.1)))
    before = engine.runtime.selecting_steps
    sparse, longest = answered()
    assert engine.runtime.selecting_steps - before >= longest - 1  # every decode step of the batch selected
    assert any(d and s for d, s in zip(dense, sparse)), f"dense {dense}, tokenbutler 10% {sparse}"


@pytest.mark.slow
def test_below_the_floor_nothing_is_scored(engine, monkeypatch):
    """5% of a ~100-token prompt is below sinks + the narrowest window: every sequence attends its sinks and
    window and the scorer is not called; a prompt whose 5% keeps candidates is scored at every decode step."""
    calls = []
    score = engine.runtime.scorer.score
    monkeypatch.setattr(engine.runtime.scorer, "score", lambda *a: (calls.append(a[0]), score(*a))[1])
    engine.runtime.enabled = True
    engine.runtime.set_selection(SelectionConfig(budget=Budget(fraction=0.05)))
    prompt = list(needle_prompts(engine.tokenizer, 1, 1024)[0].prompt_ids)
    before = engine.runtime.selecting_steps
    assert len(generate(engine.llm, [prompt[:100]], 6)[0]) == 6
    assert engine.runtime.selecting_steps - before >= 5 and calls == []  # sparse steps, nothing scored
    generate(engine.llm, [prompt[:600]], 4)  # 5% of 600 is 30: 10 kept past the floor of 20
    assert len(calls) >= 3 * (engine.runtime.num_layers - len(engine.runtime.dense))


def test_blocks_touched_counts_distinct_blocks_per_row():
    positions = torch.tensor([[[0, 1, 17, 40, -1], [5, 6, 7, -1, -1]]])
    assert paged.blocks_touched(positions, 16) == (7, 3 + 1)
    assert paged.blocks_touched(positions, 1) == (7, 7)


def test_layers_predicting_for_the_same_sequences_in_a_step_share_one_sub_batch():
    """So TokenButler's query network runs once per producer and step, not once per consumer layer."""
    _, _, table, _ = paged_sequences([48, 48], seed=5)
    selection = SelectionConfig(budget=Budget(tokens=16), sinks=2, window=4, interval=4)
    reuse = paged.SelectionReuse(selection.interval)
    seen = []
    predict = random_predictor(seen)

    for step in range(2):
        reuse.next_step()
        batch = make_batch([40 + 4 * step, 30 + 4 * step], table, selection)  # a step later: nothing kept fits
        for layer in (3, 4, 5):
            reuse.select(layer, batch, predict)
    assert len(seen) == 6 and seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5]
    assert seen[0] is not seen[3]
