"""The page prefilter (selection/pages.py): its bounds, when it applies, and the native kernel selecting what
the torch form selects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from offload_engine import native
from offload_engine.errors import ConfigError
from offload_engine.policies.tokenbutler import TokenButlerPolicy
from offload_engine.predictor.network import quantize_keys, quantize_query
from offload_engine.selection.pages import PageBounds, PagePrefilter, PageScoring, bound_logits, page_rows
from offload_engine.selection.scores import GroupScores

from recording import record_attended
from test_native import built_native, built_native_cache, needs_compiler  # noqa: F401 (fixtures)
from tiny_models import seeded_policy, selecting_model


def _cache(layers=2, heads=3, dim=16, tokens=1000, dtype=torch.float32, seed=0):
    """Compact keys ``[L, KvH, d', tokens]`` as a cache stores them (int8: codes and float16 scales) and their
    values as scored ``[L, KvH, d', tokens]`` float32."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(layers, heads, tokens, dim, generator=generator)
    blocks = torch.randn(layers, heads, tokens // 50 + 1, dim, generator=generator)
    values += 3 * blocks.repeat_interleave(50, dim=2)[:, :, :tokens]  # neighbours alike, as in real keys
    if dtype == torch.int8:
        codes, scales = quantize_keys(values)
        keys = codes.transpose(-1, -2).contiguous()
        return keys, scales.contiguous(), keys.float() * scales.float().unsqueeze(-2)
    keys = values.transpose(-1, -2).to(dtype).contiguous()
    return keys, None, keys.float()


def test_the_setting_is_checked_and_applies_only_where_it_saves_half_the_pages():
    with pytest.raises(ValueError, match="at least 2"):
        PagePrefilter(1)
    with pytest.raises(ValueError, match="fewer tokens than it keeps"):
        PagePrefilter(16, 0.5)
    with pytest.raises(ConfigError, match="page_prefilter 0 turns it off"):
        TokenButlerPolicy(random_weights=True, page_prefilter=16, prefilter_factor=0.5)
    rule = PagePrefilter(16, 4.0)
    # 32k tokens, sinks 4, window 128, keep 1916: 480 pages of 2040 scored
    assert rule.kept_pages(32768, 4, 32768 - 128, 1916) == math.ceil(4 * 1916 / 16)
    assert rule.kept_pages(32768, 4, 32768 - 128, 15) == 0  # under one page kept
    assert rule.kept_pages(2048, 4, 2048 - 128, 300) == 0  # 75 pages of 120: more than half
    assert rule.kept_pages(2048, 4, 2048 - 128, 200) == 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_bounds_hold_every_tokens_logit_and_refresh_only_what_completed(dtype):
    keys, scales, values = _cache(tokens=1000, dtype=dtype)
    rule = PagePrefilter(16)
    bounds = PageBounds(2, 3, 16, 1024, rule, torch.device("cpu"), row_length=70, key_dtype=dtype)
    bounds.refresh(keys, scales, 500)
    assert bounds.complete == 500 // 16
    bounds.refresh(keys, scales, 1000)  # the rest in a second call
    assert bounds.complete == 1000 // 16
    pages = values[..., : 62 * 16].unflatten(-1, (62, 16))
    highest, lowest = bounds.bounds[:, :, :16, :62], bounds.bounds[:, :, 16:, :62]
    if dtype == torch.int8:  # the bounds kept as int8 codes too, rounded outwards: still bounds, a code wide
        step = (pages.abs().amax(-1).amax(2, keepdim=True) / 127 * 1.01).clamp(min=2**-14)
        assert (highest >= pages.amax(-1)).all() and (highest <= pages.amax(-1) + step).all()
        assert (lowest <= pages.amin(-1)).all() and (lowest >= pages.amin(-1) - step).all()
        codes = bounds.bound_codes[..., :62].float() * bounds.bound_scales[..., :62].float().unsqueeze(2)
        torch.testing.assert_close(codes, bounds.bounds[..., :62], rtol=0, atol=0)  # what both paths rank by
    else:
        torch.testing.assert_close(highest, pages.amax(-1))
        torch.testing.assert_close(lowest, pages.amin(-1))
    stored = keys[..., : 62 * 16].unflatten(-1, (62, 16)).transpose(2, 3)  # the blocks: each page's keys
    if dtype == torch.int8:  # in fours of dims, as the quad products take them
        stored = stored.unflatten(3, (4, 4)).transpose(-1, -2)
    assert torch.equal(bounds.blocks[:, :, :62], stored)
    if scales is not None:
        assert torch.equal(bounds.block_scales[:, :, :62], scales[..., : 62 * 16].unflatten(-1, (62, 16)))
    queries = torch.randn(2, 3, 3, 16)
    logits = torch.matmul(queries, values[..., : 62 * 16]).unflatten(-1, (62, 16))
    assert (logits <= bound_logits(queries, bounds.bounds[..., :62]).unsqueeze(-1) + 1e-4).all()
    # keys written again from 320 (a prefix reuse): the pages from there are recomputed from the new keys
    keys[..., 320:] = keys[..., :680]
    if scales is not None:
        scales[..., 320:] = scales[..., :680]
    bounds.forget(320)
    assert bounds.complete == 20
    bounds.refresh(keys, scales, 1000)
    again = PageBounds(2, 3, 16, 1024, rule, torch.device("cpu"), key_dtype=dtype)
    again.refresh(keys, scales, 1000)
    torch.testing.assert_close(bounds.bounds[..., :62], again.bounds[..., :62])
    assert torch.equal(bounds.blocks[:, :, :62], again.blocks[:, :, :62])


def _torch_selection(grouped, keys, scales, bounds, m, lo, hi, keep, rule, reduction):
    pages = PageScoring(bounds.of_layers(0, keys.shape[0]), rule, keep)
    scores = GroupScores(grouped, keys, lo, hi, reduction, scales, tokens=m, pages=pages).compute()
    return [set((torch.topk(row, keep).indices + lo).tolist()) for row in scores.flatten(0, 1)]


def _native_selection(grouped, keys, scales, bounds, m, lo, hi, keep, rule, reduction):
    rows = grouped.shape[0] * grouped.shape[1]
    capacity, slots = keys.shape[-1], keep + 8
    tables = (np.full((rows, slots + 1), -1, np.int64), np.full((rows, capacity + 1), -1, np.int32),
              np.zeros((rows, slots + 1), np.bool_))
    pages = page_rows(bounds.of_layers(0, keys.shape[0]), rule) if rule is not None else None
    positions, _, counts = native.kernels().select_rows(
        grouped.reshape(rows, -1, grouped.shape[-1]).contiguous(), keys.flatten(0, 1), lo, hi, keep, *tables,
        reduction, None if scales is None else scales.flatten(0, 1), pages)
    assert counts.tolist() == [keep] * rows
    return [set(row[:keep].tolist()) for row in positions]


@needs_compiler
@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_the_kernel_selects_what_the_torch_form_selects(built_native, dtype, reduction):
    """The same pages and tokens, but for scores within float rounding of each other at a cut (the kernel
    rounds the query to bfloat16 or int8 where it multiplies such keys in pairs or quads)."""
    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    m, lo, keep, rule = 3000, 4, 150, PagePrefilter(16, 4.0)
    hi = m - 64
    keys, scales, _ = _cache(tokens=m + 40, dtype=dtype, seed=1)  # capacity past the step's tokens
    grouped = torch.randn(2, 3, 3, 16, generator=torch.Generator().manual_seed(2))
    bounds = PageBounds(2, 3, 16, keys.shape[-1], rule, torch.device("cpu"), row_length=200, key_dtype=dtype)
    bounds.refresh(keys, scales, m)
    assert rule.kept_pages(m, lo, hi, keep) > 0
    torch_rows = _torch_selection(_scored(grouped, dtype), keys, scales, bounds, m, lo, hi, keep, rule,
                                  reduction)
    native_rows = _native_selection(grouped, keys, scales, bounds, m, lo, hi, keep, rule, reduction)
    full_rows = _native_selection(grouped, keys, scales, bounds, m, lo, hi, keep, None, reduction)
    exact = dtype == torch.float32
    for got, want, full in zip(native_rows, torch_rows, full_rows):
        assert len(got ^ want) <= (2 if exact else 0.04 * keep), (len(got ^ want), dtype, reduction)
        assert got != full  # the prefilter changed the selection: it ran
        assert len(got & full) >= 0.4 * keep  # and kept much of it (random keys: flat scores)


@needs_compiler
def test_a_row_the_prefilter_does_not_pay_for_selects_every_candidate_as_before(built_native):
    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    m, lo, hi, rule = 1000, 4, 936, PagePrefilter(16, 4.0)
    keys, scales, _ = _cache(tokens=m, seed=3)
    grouped = torch.randn(2, 3, 3, 16)
    bounds = PageBounds(2, 3, 16, m, rule, torch.device("cpu"), key_dtype=keys.dtype)
    bounds.refresh(keys, scales, m)
    for keep in (10, 200):  # under one page; more than half the pages
        assert rule.kept_pages(m, lo, hi, keep) == 0
        assert (_native_selection(grouped, keys, scales, bounds, m, lo, hi, keep, rule, "mean")
                == _native_selection(grouped, keys, scales, bounds, m, lo, hi, keep, None, "mean"))
        scores = GroupScores(grouped, keys, lo, hi, "mean", tokens=m, pages=PageScoring(bounds.of_layers(0, 2), rule, keep))
        torch.testing.assert_close(scores.compute(), GroupScores(grouped, keys, lo, hi, "mean", tokens=m).compute())


def _scored(grouped, dtype):
    kernels, dim = native.kernels(), grouped.shape[-1]
    if dtype == torch.bfloat16 and kernels.bf16_pair_products:
        return grouped.bfloat16().float()
    if dtype == torch.int8 and kernels.int8_quad_products:
        return quantize_query(grouped)
    return grouped


PROMPT = 480


def _engine_selections(adapter, key_dtype: str, pages: int, general: bool = False, batched: bool = True):
    """Per decode step, per layer: each KV head's attended selected positions, and the tokens, of tokenbutler
    with pages of ``pages`` (0: no prefilter); ``general``: without the planner's native producer (the
    described scores through ``prepare_select``); ``batched=False``: the per-layer torch scores."""
    from offload_engine import Budget, Engine, EngineConfig, KVMode, SamplingConfig, SelectionConfig

    policy = seeded_policy(adapter, "tokenbutler")
    policy.key_dtype, policy.page_prefilter = key_dtype, pages
    policy.__post_init__()  # the setting checked and taken again, as at construction
    if general:
        policy.native_scoring = lambda producer: None
    config = SelectionConfig(policy="tokenbutler", budget=Budget(tokens=48), sinks=2, window=6)
    engine = Engine(adapter, EngineConfig(context=512, mode=KVMode.SPARSE_OFFLOAD, selection=config),
                    policy=policy)
    seen = record_attended(engine, batched)
    prompt = torch.randint(0, 320, (PROMPT,), generator=torch.Generator().manual_seed(5)).tolist()
    result = engine.generate(prompt, SamplingConfig(max_new_tokens=8))
    return seen, result.token_ids


@needs_compiler
@pytest.mark.parametrize("key_dtype", ["float32", "bfloat16", "int8"])
def test_in_the_engine_every_native_path_selects_alike_and_torch_within_rounding(built_native, key_dtype):
    """tokenbutler with pages of 16 over a 480-token prompt (a budget of 48: 10 of 30 pages kept): the planner's
    native producer and the general path's one native call attend the same, the prefilter changes what is
    attended (it runs), and the per-layer torch scores attend nearly the same at the first step (before
    tokens may part: the torch and native logits differ by float rounding)."""
    if native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    adapter = selecting_model()
    fast, fast_tokens = _engine_selections(adapter, key_dtype, 16)
    general, general_tokens = _engine_selections(adapter, key_dtype, 16, general=True)
    off, _ = _engine_selections(adapter, key_dtype, 0)
    torch_path, _ = _engine_selections(adapter, key_dtype, 16, batched=False)
    assert fast == general and fast_tokens == general_tokens
    assert fast[0] != off[0]
    for layer in range(1, 5):
        for got, want in zip(fast[0][layer], torch_path[0][layer]):
            differ = set(got) ^ set(want)
            assert len(differ) <= 0.1 * len(want), (layer, len(differ), len(want))


def test_an_eval_variant_takes_the_prefilter_as_a_whole_page_size():
    from offload_engine.evaluation.harness import PolicyVariant, check_policy_spec

    assert PolicyVariant.parse("tokenbutler[page_prefilter=16,prefilter_factor=8]").policy_options() == {
        "page_prefilter": 16, "prefilter_factor": 8.0}
    check_policy_spec("critical(tokenbutler)[page_prefilter=16]")
    for spec in ("tokenbutler[page_prefilter=1]", "tokenbutler[page_prefilter=x]", "quest[page_prefilter=16]",
                 "tokenbutler[page_prefilter=16,prefilter_factor=0.5]", "tokenbutler[prefilter_factor=x]"):
        with pytest.raises(ConfigError, match="page_prefilter|prefilter_factor"):
            check_policy_spec(spec)


def test_an_eval_variant_takes_a_keep_bonus_as_a_number_and_records_it():
    from offload_engine.evaluation.harness import PolicyVariant, check_policy_spec

    assert PolicyVariant.parse("tokenbutler[keep_bonus=0.25,interval=4]").selection_overrides() == {
        "keep_bonus": 0.25, "interval": 4}
    with pytest.raises(ConfigError, match="keep_bonus takes a number"):
        check_policy_spec("tokenbutler[keep_bonus=a lot]")
    check_policy_spec("quest[keep_bonus=0.5]")
    check_policy_spec("tokenbutler[keep_bonus=0.5,page_prefilter=0]")
    check_policy_spec("critical(tokenbutler)[keep_bonus=1]")  # each of its stages takes the bonus
    for spec, message in (("tokenbutler[keep_bonus=0.25,page_prefilter=16]", "page prefilter"),
                          ("critical(tokenbutler)[keep_bonus=1,page_prefilter=16]", "page prefilter"),
                          ("streaming[keep_bonus=1]", "ranks no"), ("critical(streaming)[keep_bonus=1]", "ranks no")):
        with pytest.raises(ConfigError, match=message):  # refused with the other settings, before a model loads
            check_policy_spec(spec)


@needs_compiler
def test_pages_the_cpu_kernel_cannot_take_are_refused_not_scored_slower(built_native):
    """int8 compact keys are scored by quad products from blocks of 16: pages of another size would send every
    step to the torch form, which scores every token anyway; the engine says so and what to use instead."""
    if native.kernels() is None or not native.kernels().int8_quad_products:
        pytest.skip(f"needs the native kernels with AVX512-VNNI: {native.status()}")
    with pytest.raises(ConfigError, match="--page-prefilter 8 with int8 compact keys.*use --page-prefilter 16"):
        _engine_selections(selecting_model(), "int8", 8)
    assert _engine_selections(selecting_model(), "bfloat16", 8)[1]  # float keys gather pages of any size
