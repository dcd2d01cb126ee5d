"""Top-k on the CPU (the native kernel where it is built, else a numpy partition) gives what torch.topk
gives; positions and the neighbour rules."""

from __future__ import annotations

import math

import pytest
import torch

from offload_engine import native
from offload_engine.selection import ranking
from offload_engine.selection.ranking import topk_positions, topk_unsorted

# float32 rows on the CPU: the native kernel (where it is built) and numpy's partition (where it is not)
CPU_PATHS = pytest.mark.parametrize("cpu_topk", ["native", "numpy"], indirect=True)


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def cpu_topk(request, monkeypatch, native_cache):
    """The CPU top-k path under test, the native kernels switched on or off to match."""
    monkeypatch.setenv("TBRUN_NATIVE_CACHE", str(native_cache))
    monkeypatch.setenv("TBRUN_NATIVE", "1" if request.param == "native" else "0")
    native.reset()
    if request.param == "native" and native.kernels() is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    yield request.param
    native.reset()


def _as_sets(index: torch.Tensor) -> list[set[int]]:
    flat = index.reshape(-1, index.shape[-1])
    return [set(row.tolist()) for row in flat]


@pytest.mark.parametrize("shape, keep", [((3, 4, 17000), 1000), ((12, 20000), 1400), ((2, 3, 33000), 64),
                                         ((5, 300), 300), ((7, 50), 1)])
@pytest.mark.parametrize("kind", ["gauss", "peaked", "ties"])
@CPU_PATHS
def test_the_cpu_top_k_selects_the_same_tokens_as_torch_topk(shape, keep, kind, cpu_topk, monkeypatch):
    generator = torch.Generator().manual_seed(sum(shape) + keep)
    scores = torch.randn(shape, generator=generator)
    if kind == "peaked":  # softmax-like: a few large scores, a long flat tail
        scores = torch.softmax(scores * 4, dim=-1)
    if kind == "ties":  # many equal scores (rounded), ties at the cut
        scores = torch.round(scores * 4) / 4
    expected_values, expected_index = torch.topk(scores, keep, dim=-1, sorted=False)
    monkeypatch.setattr(ranking.torch, "topk", _forbidden)  # the partition path, not torch.topk
    values, index = topk_unsorted(scores, keep)
    assert index.shape == expected_index.shape == (*shape[:-1], keep) and index.dtype == torch.long
    assert torch.equal(scores.gather(-1, index), values)  # the values are the scores of the indices
    assert torch.equal(values.sort(dim=-1).values, expected_values.sort(dim=-1).values)
    if kind != "ties":
        assert _as_sets(index) == _as_sets(expected_index)
    assert all(len(row) == keep for row in _as_sets(index))  # no index twice


def _rows_with_a_misjudged_one() -> torch.Tensor:
    """``[4, 32768]`` softmax rows; in row 2 the entries a strided sample reads all rank above the rest,
    so its threshold overshoots and too few entries pass it."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.softmax(3 * torch.randn(4, 32768, generator=generator), dim=-1)
    unsampled = torch.arange(32768) % ranking.PREFILTER_STRIDE != 0  # positions the sample never reads
    spread = torch.rand(32768, generator=generator)
    scores[2] = torch.where(unsampled, spread, 1.0 + spread)  # the sampled 4k above the rest: too few pass
    return scores


@CPU_PATHS
def test_a_row_the_sample_misjudges_still_gets_its_exact_top_k(cpu_topk, monkeypatch):
    scores = _rows_with_a_misjudged_one()
    expected = torch.topk(scores, 2048, dim=-1, sorted=False).indices
    monkeypatch.setattr(ranking.torch, "topk", _forbidden)
    values, index = topk_unsorted(scores, 2048)
    assert _as_sets(index) == _as_sets(expected) and torch.equal(scores.gather(-1, index), values)


def test_long_rows_are_cut_by_a_sampled_threshold_and_a_misjudged_row_is_partitioned_whole(monkeypatch):
    """numpy's path. Rows of 32k candidates keeping 2k: only entries at or above a sampled threshold are
    partitioned; the misjudged row is partitioned whole, and both give torch.topk's tokens."""
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    scores = _rows_with_a_misjudged_one()
    expected = torch.topk(scores, 2048, dim=-1, sorted=False).indices
    partitioned = []
    original = ranking.np.argpartition
    monkeypatch.setattr(ranking.np, "argpartition",
                        lambda a, *args, **kw: partitioned.append(a.shape) or original(a, *args, **kw))
    monkeypatch.setattr(ranking.torch, "topk", _forbidden)
    _, index = topk_unsorted(scores, 2048)
    assert _as_sets(index) == _as_sets(expected)
    assert partitioned.count((32768,)) == 1  # only the misjudged row whole
    assert all(shape[-1] < 32768 // 4 for shape in partitioned if shape != (32768,))  # the others cut first


@CPU_PATHS
def test_the_cut_keeps_nan_scores_as_the_plain_partition_and_torch_topk_rank_them_first(cpu_topk, monkeypatch):
    """A few NaN scores in a long row fall below no threshold: the cut path returns what the plain
    partition (and torch.topk) return, NaN positions among them; a row of NaNs only is partitioned whole."""
    generator = torch.Generator().manual_seed(5)
    scores = torch.softmax(3 * torch.randn(3, 32768, generator=generator), dim=-1)
    scores[0, [7, 1001, 20000]] = float("nan")  # unsampled positions (not multiples of 8)
    scores[1, ::ranking.PREFILTER_STRIDE] = float("nan")  # the whole sample NaN: its threshold is NaN
    expected = torch.topk(scores, 2048, dim=-1, sorted=False).indices
    monkeypatch.setattr(ranking.torch, "topk", _forbidden)
    _, index = topk_unsorted(scores, 2048)
    assert _as_sets(index)[0::2] == _as_sets(expected)[0::2] and {7, 1001, 20000} <= _as_sets(index)[0]
    assert scores[1, index[1]].isnan().all()  # 2,048 of the 4,096 NaNs, which ones is a tie
    assert all(len(row) == 2048 for row in _as_sets(index))


def _forbidden(*args, **kwargs):
    raise AssertionError("torch.topk ran where the partition should have")


@CPU_PATHS
def test_minus_infinity_is_never_a_position_and_strided_scores_rank_like_their_copy(cpu_topk, monkeypatch):
    """-inf candidates (not selectable) become padding, last; a non-contiguous view ranks like its copy."""
    scores = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1))
    scores[1, 1500:] = float("-inf")  # 1,500 finite candidates, keep 1,600: 100 of them -inf
    monkeypatch.setattr(ranking.torch, "topk", _forbidden)
    positions = topk_positions(scores, 1600, lo=10)
    assert (positions[1] >= 0).sum() == 1500 and ((positions[1, :1500] - 10) < 1500).all()
    assert (positions[1, 1500:] == -1).all()  # padding last, after sorting
    assert (positions[0] >= 10).all()
    view = torch.randn(3000, 4)[:, 1:].t()  # [3, 3000], strides (1, 4)
    assert _as_sets(topk_unsorted(view, 300)[1]) == _as_sets(topk_unsorted(view.contiguous(), 300)[1])


def test_other_dtypes_use_torch_topk_and_gradients_are_no_obstacle(monkeypatch):
    calls = []
    original = torch.topk
    monkeypatch.setattr(ranking.torch, "topk", lambda *a, **k: calls.append(a[0].dtype) or original(*a, **k))
    topk_unsorted(torch.randn(2, 1200).bfloat16(), 40)  # numpy has no bfloat16: torch.topk
    _, index = topk_unsorted(torch.randn(2, 1200, requires_grad=True), 40)  # read detached: no error
    assert calls == [torch.bfloat16] and index.shape == (2, 40)
    doubles = torch.randn(3, 500, dtype=torch.float64)
    values, index = topk_unsorted(doubles, 30)  # float64 partitions too
    assert values.dtype == torch.float64 and _as_sets(index) == _as_sets(original(doubles, 30).indices)
    values, index = topk_unsorted(torch.randn(0, 4, 700), 50)  # no rows: empty, shaped
    assert values.shape == index.shape == (0, 4, 50) and index.dtype == torch.long and calls == [torch.bfloat16]


@CPU_PATHS
def test_a_row_slice_of_a_wider_tensor_ranks_like_its_copy(cpu_topk, monkeypatch):
    """Scores cut from wider rows (the candidates of ``[lo, hi)`` of a producer's scores): rows at a
    stride larger than their length rank like their copy, and small or full keeps are exact."""
    wide = torch.softmax(2 * torch.randn(2, 3, 9000, generator=torch.Generator().manual_seed(4)), dim=-1)
    view = wide[..., 100:8800]
    monkeypatch.setattr(ranking.torch, "topk", _forbidden)
    for keep in (1, 1000, 2175, 8700):
        values, index = topk_unsorted(view, keep)
        assert _as_sets(index) == _as_sets(topk_unsorted(view.contiguous(), keep)[1])
        assert torch.equal(view.gather(-1, index), values)
    assert _as_sets(topk_unsorted(view, 1)[1]) == _as_sets(view.argmax(-1, keepdim=True))


@pytest.fixture
def kernels(monkeypatch, native_cache):
    """The native kernels, built (or the test skipped, saying why), switched off again after the test."""
    monkeypatch.setenv("TBRUN_NATIVE_CACHE", str(native_cache))
    monkeypatch.delenv("TBRUN_NATIVE", raising=False)
    native.reset()
    built = native.kernels()
    if built is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    yield built
    native.reset()


def test_the_native_top_k_keeps_the_first_of_equal_scores_at_the_cut(kernels):
    """Every score above the cut, then the first of those equal to it: a defined choice among ties."""
    row = torch.zeros(1, 10000)
    row[0, [5, 50, 9000]] = torch.tensor([3.0, -1.0, 2.0])  # two above the zeros, one below
    values, index = kernels.topk_rows(row, 6)
    assert sorted(index[0].tolist()) == [0, 1, 2, 3, 5, 9000] and sorted(values[0].tolist()) == [0, 0, 0, 0, 2, 3]
    negative = -torch.arange(1, 5001, dtype=torch.float32).view(1, -1)  # negative scores order too
    assert set(kernels.topk_rows(negative, 3)[1][0].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="keep 0 of 10000"):
        kernels.topk_rows(row, 0)
    with pytest.raises(TypeError, match="float32 CPU rows"):
        kernels.topk_rows(row.double(), 3)


@pytest.mark.parametrize("keep", [1, 700, 4999, 5000])
def test_the_native_top_k_is_exact_where_most_scores_share_their_leading_bits(keep, kernels):
    """The cut's bits are found 8 at a time, and only the scores sharing the bits found so far are counted
    for the next ones: here thousands of distinct scores share their first 9 to 31 bits (consecutive
    floats above 1, a cluster a few units in the last place apart, negatives, an infinity), so every
    narrowing keeps many and the cut falls inside the clusters."""
    generator = torch.Generator().manual_seed(keep)
    above_one = (torch.arange(1, 3001, dtype=torch.int32) + 0x3F800000).view(torch.float32)  # 1 + k ulp
    cluster = (torch.arange(0, 1500, dtype=torch.int32) * 3 + 0x3F000000).view(torch.float32)  # 0.5 + 3k ulp
    negatives = -(torch.arange(1, 500, dtype=torch.int32) + 0x3F800000).view(torch.float32)
    row = torch.cat([above_one, cluster, negatives, torch.tensor([float("inf")])])
    row = row[torch.randperm(row.numel(), generator=generator)].view(1, -1)
    expected = set(torch.topk(row, keep, dim=-1).indices[0].tolist())  # the scores are distinct
    values, index = kernels.topk_rows(row, keep)
    assert set(index[0].tolist()) == expected and torch.equal(row.gather(-1, index), values)


def test_held_terms_scale_masses_and_shift_logits_by_the_same_factor():
    from offload_engine.selection.ranking import favour_held, held_terms

    assert held_terms(0.0, "mass") is None and held_terms(0.0, "logit") is None
    mass, logit = held_terms(0.25, "mass"), held_terms(0.25, "logit")
    assert (mass.mul, mass.add) == (1.25, 0.0)
    assert logit.mul == 1.0 and logit.add == pytest.approx(math.log(1.25), rel=1e-6)
    with pytest.raises(ValueError, match="score kind"):
        held_terms(0.25, "rank")
    logits = torch.tensor([[1.0, 2.0, float("-inf"), float("nan"), -3.0]])
    held = torch.tensor([[True, False, True, True, True]])
    favoured = favour_held(logits, held, logit)
    assert favoured[0, 0] == 1.0 + logit.add and favoured[0, 1] == 2.0 and favoured[0, 2] == float("-inf")
    assert favoured[0, 3].isnan() and favoured[0, 4] == -3.0 + logit.add
    # the same factor on the probability: a held token's softmax share grows by 1.25 against the others'
    assert torch.softmax(favoured[0, :2], -1)[0] / torch.softmax(favoured[0, :2], -1)[1] == pytest.approx(
        1.25 * math.exp(-1.0), rel=1e-5)
    masses = torch.tensor([0.0, 0.1, 0.2])
    assert torch.equal(favour_held(masses, torch.tensor([True, True, False]), mass), torch.tensor([0.0, 0.125, 0.2]))
    assert torch.equal(logits[0, :2], torch.tensor([1.0, 2.0]))  # the scores given are not modified
