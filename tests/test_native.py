"""The native CPU selection kernel (offload_engine/native): built with the machine's compiler, the same
scores as torch, the same selections, and a torch fallback wherever it cannot be built."""

from __future__ import annotations

import platform
import re
import shutil

import pytest
import torch

from offload_engine import native
from offload_engine.policies.tokenbutler import ProjectedKeyCache, compact_key_dtype, padded_row_length
from offload_engine.predictor.network import quantize_keys, quantize_query
from offload_engine.selection.scores import fused_group_scores, group_mean_probabilities

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None,
    reason="no C++ compiler on PATH: the native kernel cannot be built here (the torch path is tested elsewhere)",
)


@pytest.fixture(scope="module")
def built_native_cache(tmp_path_factory):
    """A cache folder the library is built into once for the tests that only call kernels (each build takes
    several seconds; tests of building and caching take ``fresh_native``)."""
    return tmp_path_factory.mktemp("native")


@pytest.fixture
def built_native(built_native_cache, monkeypatch):
    """A native module loading its library from the module's shared cache (built there on first use)."""
    monkeypatch.setenv("TBRUN_NATIVE_CACHE", str(built_native_cache))
    monkeypatch.delenv("TBRUN_NATIVE", raising=False)
    native.reset()
    yield built_native_cache
    native.reset()


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """A native module with no library loaded and its cache in a temporary folder."""
    monkeypatch.setenv("TBRUN_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.delenv("TBRUN_NATIVE", raising=False)
    native.reset()
    yield tmp_path / "native"
    native.reset()


def _torch_scores(grouped: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return group_mean_probabilities(torch.matmul(grouped, keys))


def _as_scored(grouped: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The query ``[..., d']`` as the kernels multiply it into keys of ``dtype``: rounded to bfloat16 where they
    take bfloat16 keys in pair products (AVX512-BF16, even d'), quantised to int8 where they take int8 keys in
    quad products (AVX512-VNNI, d' a multiple of 4), else as it is."""
    kernels, dim = native.kernels(), grouped.shape[-1]
    if dtype == torch.bfloat16 and dim % 2 == 0 and kernels.bf16_pair_products:
        return grouped.bfloat16().float()
    if dtype == torch.int8 and dim % 4 == 0 and kernels.int8_quad_products:
        return quantize_query(grouped)
    return grouped


@needs_compiler
@pytest.mark.parametrize("layers, kv_heads, group, dim, tokens", [
    (2, 3, 3, 16, 5000),   # SmolLM2's shape at G = 2
    (1, 2, 7, 16, 700),    # Qwen2.5-0.5B's group (7 query heads per KV head: a block of 4, then 3)
    (4, 8, 4, 32, 1500),   # Llama-3.1-8B's group, d' 32
    (1, 1, 1, 5, 1),       # one token, odd d'
    (1, 2, 5, 8, 33),      # two vectors of 16 tokens and a scalar tail of one
    (1, 1, 2, 16, 1025),   # two tiles and a tail of one token
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_gives_torchs_group_mean_softmax(layers, kv_heads, group, dim, tokens, dtype, built_native):
    """float32 keys, and bfloat16 ones: torch's scores of the widened keys, against the query rounded to
    bfloat16 where the kernel takes pair products (AVX512-BF16, even d'; the odd d' here takes the other path)."""
    generator = torch.Generator().manual_seed(tokens + dim)
    capacity = tokens + 37
    cache = ProjectedKeyCache(layers, kv_heads, capacity, dim, dtype, torch.device("cpu"))
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator) * 2)
    keys = cache.columns(range(1, layers + 1), 0, tokens)  # a view with the cache's padded strides
    grouped = torch.randn(layers, kv_heads, group, dim, generator=generator)
    fused = fused_group_scores(grouped, keys)
    assert fused is not None, native.status()
    expected = _torch_scores(_as_scored(grouped, dtype), keys.float())
    assert fused.shape == expected.shape == (layers, kv_heads, tokens)
    torch.testing.assert_close(fused, expected, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(fused.sum(-1), torch.ones(layers, kv_heads), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_the_running_maximum_rescales_earlier_tiles(built_native):
    """Logits that grow along the row: every later tile raises the maximum, so each earlier tile's
    exponentials are rescaled (the online softmax); with one spike late in the row the rest are tiny."""
    tokens = 4096
    keys = torch.zeros(1, 1, 16, tokens)
    keys[0, 0, 0] = torch.linspace(-30, 30, tokens)
    keys[0, 0, 1, 3900] = 50.0
    grouped = torch.zeros(1, 1, 3, 16)
    grouped[0, 0, :, 0] = torch.tensor([1.0, 0.5, -1.0])
    grouped[0, 0, :, 1] = torch.tensor([0.0, 1.0, 0.0])
    fused = fused_group_scores(grouped, keys)
    torch.testing.assert_close(fused, _torch_scores(grouped, keys), rtol=2e-5, atol=1e-9)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_tiles_maximum_is_found_wherever_in_the_tile_it_is(dtype, built_native):
    """Each row holds one logit about 10 above the rest, at a place of its own: the first token, the last of
    a tile, the vector part of the last tile, the first token after the pair kernel's 32-token blocks, and the
    scalar tail. The kernel takes each tile's maximum from its logits as they are stored; had it missed the
    spike, the spike's exponential would be taken of a positive number, which the scalar exponential clamps
    (and a larger gap would overflow the vector one): the row would not be torch's softmax, in which the
    spike holds about 0.9. int8 keys: the spike's code and scale both negative (the scale applied first).
    1 to 5 query heads (blocks of 4 and 1), one library build."""
    for group in range(1, 6):
        _check_spikes(group, dtype)


def _check_spikes(group: int, dtype: torch.dtype) -> None:
    """One row per place, each with its spike there; the kernel's group-mean scores against torch's."""
    tokens, places = 1061, (0, 511, 1040, 1056, 1060)  # 2 tiles of 512 and 37 tokens: a 32-block and 5
    generator = torch.Generator().manual_seed(group)
    grouped = torch.randn(1, len(places), group, 16, generator=generator) * 0.1
    grouped[..., 0] = 2.0  # every head reads the spike's dimension
    if dtype == torch.int8:
        keys = torch.randint(-20, 21, (1, len(places), 16, tokens), generator=generator, dtype=torch.int8)
        scales = torch.full((1, len(places), tokens), 0.01, dtype=torch.float16)
        for row, place in enumerate(places):
            keys[0, row, 0, place], scales[0, row, place] = -100, -0.05  # key 5 at dim 0: logit ~10
        values = keys.float() * scales.float().unsqueeze(-2)
    else:
        values = torch.randn(1, len(places), 16, tokens, generator=generator) * 0.1
        for row, place in enumerate(places):
            values[0, row, 0, place] = 5.0
        keys, scales = values.to(dtype), None
        values = keys.float()
    fused = fused_group_scores(grouped, keys, "mean", scales)
    assert fused is not None, native.status()
    expected = _torch_scores(_as_scored(grouped, dtype), values)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, expected, rtol=2e-5, atol=1e-7)
    assert fused[0, torch.arange(len(places)), torch.tensor(places)].min() > 0.5  # each spike holds most of its row


@needs_compiler
def test_selections_from_the_kernels_scores_are_torchs_but_for_near_ties(built_native):
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 16, 20000, generator=generator)
    grouped = torch.randn(2, 3, 3, 16, generator=generator) * 0.5
    fused, expected = fused_group_scores(grouped, keys), _torch_scores(grouped, keys)
    keep = 2000
    chosen = torch.topk(fused, keep, dim=-1).indices
    wanted = torch.topk(expected, keep, dim=-1).indices
    kth = torch.topk(expected, keep, dim=-1).values[..., -1:]
    for got, want, row, cut in zip(chosen.flatten(0, 1), wanted.flatten(0, 1), expected.flatten(0, 1),
                                   kth.flatten(0, 1)):
        differ = set(got.tolist()) ^ set(want.tolist())
        assert len(differ) <= 4  # only tokens whose scores sit at the cut, within float rounding
        assert all(abs(row[i].item() - cut.item()) <= 1e-5 * cut.item() for i in differ)


@needs_compiler
def test_the_library_is_built_once_and_reused_from_the_cache(fresh_native):
    assert native.kernels() is not None, native.status()
    assert native.status().startswith("on:")
    built = list(fresh_native.glob("tbrun_selection_*.so"))
    assert len(built) == 1 and not list(fresh_native.glob("tmp*"))  # no scratch file of the build left
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not compiled again


def test_switched_off_the_torch_path_runs(fresh_native, monkeypatch):
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    native.reset()
    assert native.kernels() is None and "TBRUN_NATIVE=0" in native.status()
    keys, grouped = torch.randn(1, 2, 16, 300), torch.randn(1, 2, 3, 16)
    assert fused_group_scores(grouped, keys) is None
    assert not fresh_native.exists()  # nothing was built


def test_without_a_working_compiler_the_status_says_why_and_nothing_breaks(fresh_native, monkeypatch, tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    assert native.kernels() is None
    assert "unavailable" in native.status() and "broken" in native.status()
    assert not list(fresh_native.glob("*"))  # no half-written library or scratch file left behind
    keys, grouped = torch.randn(1, 2, 16, 300), torch.randn(1, 2, 3, 16)
    assert fused_group_scores(grouped, keys) is None


def test_the_kernel_is_not_used_off_the_cpu_float32_and_bfloat16_path(built_native):
    grouped = torch.randn(1, 2, 3, 16)
    assert fused_group_scores(grouped, torch.randn(1, 2, 16, 300).double()) is None
    assert fused_group_scores(grouped, torch.randn(1, 2, 16, 300).half()) is None
    assert fused_group_scores(grouped, torch.randn(1, 2, 300, 16).transpose(-1, -2)) is None  # tokens strided


@pytest.mark.parametrize("capacity", [1, 1000, 4096, 32768, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_long_compact_key_rows_are_padded_a_line_past_a_multiple_of_four_kib(capacity, dtype):
    """Rows a multiple of 4 KiB apart map to the same cache sets: the d' rows the kernel streams side
    by side would evict each other (measured 2.3x slower at 32k). Rows under 4 KiB are not padded."""
    length = padded_row_length(capacity, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    if capacity * size < 4096:
        assert length == capacity
    else:
        assert capacity <= length and (length * size) % 4096 == 64
        assert (length - capacity) * size <= 4096 + 64
    cache = ProjectedKeyCache(2, 3, capacity, 16, dtype, torch.device("cpu"))
    assert cache.keys.shape == (2, 3, 16, capacity)
    assert cache.keys.stride(-2) == padded_row_length(capacity, cache.keys.dtype)
    assert cache.nbytes >= cache.keys.numel() * cache.keys.element_size()


@needs_compiler
@pytest.mark.parametrize("threads", [1, 4])
def test_the_native_residency_update_is_the_numpy_one_at_engine_sizes(threads, built_native, monkeypatch):
    """6 rows of 2,048 slots over 40k positions, selections that keep 0-100% of the last one and end in
    padding: the same plans, slot maps and masks as the numpy form, step after step (with 4 threads the
    rows are split among them: 2, 2, 2 or, for 3 rows, 1, 1, 1)."""
    from offload_engine.selection.residency import ResidencyMap

    monkeypatch.setenv(native.THREADS_VARIABLE, str(threads))  # what the wrapper passes the kernel

    rows, slots, capacity = 6, 2048, 40000
    maps = {}
    for kind in ("native", "numpy"):
        monkeypatch.setenv("TBRUN_NATIVE", "1" if kind == "native" else "0")
        native.reset()
        maps[kind] = ResidencyMap(rows, slots, torch.device("cpu"), capacity)
    generator = torch.Generator().manual_seed(5)
    current = torch.stack([torch.randperm(capacity, generator=generator)[:slots] for _ in range(rows)])
    for step in range(12):
        keep = int(slots * torch.rand((), generator=generator))  # how many of the last selection stay
        fresh = torch.stack([torch.randperm(capacity, generator=generator)[: 2 * slots] for _ in range(rows)])
        chosen = torch.full((rows, slots), -1, dtype=torch.long)
        for r in range(rows):
            new = fresh[r][~torch.isin(fresh[r], current[r, :keep])][: slots - keep - step]
            row = torch.cat([current[r, :keep], new])
            chosen[r, : len(row)] = row[torch.randperm(len(row), generator=generator)]
        part = slice(None) if step % 2 else slice(1, 4)
        plans = {}
        for kind, rmap in maps.items():
            monkeypatch.setenv("TBRUN_NATIVE", "1" if kind == "native" else "0")
            native.reset()
            plans[kind] = rmap.update(chosen[part], part)
        for field in ("positions", "slots", "counts"):
            assert torch.equal(getattr(plans["native"], field), getattr(plans["numpy"], field)), (step, field)
        for field in ("slot_pos", "slot_of", "active"):
            assert torch.equal(getattr(maps["native"], field), getattr(maps["numpy"], field)), (step, field)
        assert plans["native"].positions.is_contiguous() and plans["native"].slots.is_contiguous()
        current = torch.where(chosen >= 0, chosen, current) if part == slice(None) else current



@needs_compiler
def test_a_one_row_table_of_any_stride_is_read_by_its_length_and_overlapping_rows_are_refused(built_native):
    """numpy gives a row made by ``[None]`` the stride 0, and the update's map of positions is as long as a
    slot_of row (its length, passed apart from its stride): a one-row table and rows cut from wider ones give
    the same plan as a plain table, and rows closer than their length are refused before the kernel runs."""
    import numpy as np

    kernels = native.kernels()
    slots, capacity = 8, 50

    def tables():
        return np.full(slots + 1, -1, np.int64), np.full(capacity + 1, -1, np.int32), np.zeros(slots + 1, np.bool_)

    viewed, plain = [a[None] for a in tables()], [a.reshape(1, -1).copy() for a in tables()]
    assert viewed[1].strides[0] == 0
    for selected in ([3, 7, 20, 41, -1], [7, 44, 3, 5, 6]):
        chosen = np.array([selected], dtype=np.int64)
        got, want = kernels.residency_update(chosen, *viewed), kernels.residency_update(chosen, *plain)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert all(np.array_equal(a, b) for a, b in zip(viewed, plain))
    wide = [np.concatenate([np.repeat(a[None], 2, 0), np.zeros((2, 5), a.dtype)], 1)[:, : a.size] for a in tables()]
    narrow = [np.repeat(a[None], 2, 0) for a in tables()]
    assert wide[1].strides[0] == 4 * (capacity + 6)
    chosen = np.array([[3, 7, 20, 41, -1], [7, 44, 3, 5, 6]], dtype=np.int64)
    got, want = kernels.residency_update(chosen, *wide), kernels.residency_update(chosen, *narrow)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and all(np.array_equal(a, b) for a, b in zip(wide, narrow))
    two = np.full(2 * (capacity + 1), -1, np.int32)
    overlapping = np.lib.stride_tricks.as_strided(two, shape=(2, capacity + 1), strides=(4 * capacity, 4))
    with pytest.raises(ValueError, match="apart by their length"):
        kernels.residency_update(np.zeros((2, 2), np.int64), np.full((2, slots + 1), -1, np.int64), overlapping,
                                 np.zeros((2, slots + 1), np.bool_))

@needs_compiler
def test_a_nan_logit_makes_its_rows_nan_as_in_torch(built_native):
    keys, grouped = torch.randn(1, 2, 16, 700), torch.randn(1, 2, 3, 16)
    keys[0, 1, 3, 123] = float("nan")
    fused, expected = fused_group_scores(grouped, keys), _torch_scores(grouped, keys)
    assert expected[0, 1].isnan().all() and fused[0, 1].isnan().all()
    torch.testing.assert_close(fused[0, 0], expected[0, 0], rtol=2e-5, atol=1e-9)


@needs_compiler
def test_an_empty_selection_or_no_rows_is_what_numpy_does(built_native, monkeypatch):
    """k = 0 clears the rows' masks (after an append had filled them); zero rows is a no-op."""
    from offload_engine.selection.residency import ResidencyMap

    maps = {}
    for kind in ("native", "numpy"):
        monkeypatch.setenv("TBRUN_NATIVE", "1" if kind == "native" else "0")
        native.reset()
        maps[kind] = ResidencyMap(2, 8, torch.device("cpu"), 64)
        maps[kind].append(4, 9)
        assert maps[kind].active.any()
        plan = maps[kind].update(torch.empty(2, 0, dtype=torch.long))
        assert plan.positions.shape == (2, 0) and plan.counts.tolist() == [0, 0]
        assert maps[kind].update(torch.empty(0, 3, dtype=torch.long), slice(1, 1)).counts.numel() == 0
    for field in ("slot_pos", "slot_of", "active"):
        assert torch.equal(getattr(maps["native"], field), getattr(maps["numpy"], field)), field
    assert not maps["native"].active.any()


@needs_compiler
def test_a_changed_source_builds_a_new_library(fresh_native, monkeypatch, tmp_path):
    assert native.kernels() is not None
    source = tmp_path / "selection.cpp"
    source.write_text(native.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", source)
    native.reset()
    assert native.kernels() is not None
    assert len(list(fresh_native.glob("tbrun_selection_*.so"))) == 2
    assert all(path.stat().st_mode & 0o044 for path in fresh_native.glob("*.so"))  # readable by others


def test_switched_off_then_on_the_status_follows(built_native, monkeypatch):
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    assert "off" in native.status()
    monkeypatch.setenv("TBRUN_NATIVE", "1")
    assert "off" not in native.status()


def test_bad_arguments_are_refused_before_the_kernel_runs(built_native):
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    with pytest.raises(ValueError, match="no query heads"):
        kernels.group_scores(torch.randn(2, 0, 16), torch.randn(2, 16, 10))
    with pytest.raises(ValueError, match="past the capacity"):
        import numpy as np

        kernels.residency_update(np.array([[5]]), np.full((1, 3), -1), np.full((1, 6), -1, dtype=np.int32),
                                 np.zeros((1, 3), dtype=bool))


@needs_compiler
def test_the_scores_do_not_depend_on_the_number_of_threads(built_native, monkeypatch):
    """Rows are split among ``TBRUN_NATIVE_THREADS`` threads; each row is computed alike."""
    generator = torch.Generator().manual_seed(11)
    keys = torch.randn(2, 3, 16, 3000, generator=generator)
    grouped = torch.randn(2, 3, 3, 16, generator=generator)
    monkeypatch.delenv(native.THREADS_VARIABLE, raising=False)
    one = fused_group_scores(grouped, keys)  # the default: one thread, whatever torch uses
    monkeypatch.setenv(native.THREADS_VARIABLE, "4")  # more threads than cores is allowed; 6 rows: 2, 2, 2
    several = fused_group_scores(grouped, keys)
    assert torch.equal(one, several)


@needs_compiler
def test_threaded_calls_from_two_python_threads_at_once_give_the_one_thread_result(built_native, monkeypatch):
    """The kernels' kept workers serve one call at a time (ctypes releases the GIL, so two Python threads can be
    in the kernels together): the other call runs its rows on its own thread, with the same result."""
    from concurrent.futures import ThreadPoolExecutor

    generator = torch.Generator().manual_seed(12)
    cases = [(torch.randn(2, 3, 3, 16, generator=generator), torch.randn(2, 3, 16, 2000, generator=generator))
             for _ in range(2)]
    monkeypatch.delenv(native.THREADS_VARIABLE, raising=False)
    expected = [fused_group_scores(grouped, keys) for grouped, keys in cases]
    monkeypatch.setenv(native.THREADS_VARIABLE, "3")

    def repeat(case: int) -> bool:
        return all(torch.equal(fused_group_scores(*cases[case]), expected[case]) for _ in range(200))

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(repeat, case) for case in (0, 1)]
        assert [future.result(timeout=120) for future in running] == [True, True]  # a deadlock fails, not hangs


@needs_compiler
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork exists on POSIX systems only")
def test_a_forked_child_runs_threaded_kernels_with_workers_of_its_own(built_native, monkeypatch):
    """A child made by fork() after the parent's workers started has none of them: its threaded calls make
    their own workers and finish (they would wait forever for the parent's), with the same result."""
    import os
    import time

    generator = torch.Generator().manual_seed(13)
    grouped, keys = torch.randn(2, 3, 3, 16, generator=generator), torch.randn(2, 3, 16, 2000, generator=generator)
    monkeypatch.setenv(native.THREADS_VARIABLE, "3")
    expected = fused_group_scores(grouped, keys)  # the parent's workers are running now
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the child)
        os._exit(0 if torch.equal(fused_group_scores(grouped, keys), expected) else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "the child's threaded scores differ"
            return
        time.sleep(0.05)
    os.kill(child, 9)
    os.waitpid(child, 0)
    pytest.fail("the forked child's threaded call did not finish in 60 s (waiting for its parent's workers)")


def test_kernels_run_on_one_thread_outside_a_decode_unless_told_and_a_bad_count_is_refused(monkeypatch):
    """Outside a decode torch's thread count does not start kernel threads (they would wait for torch's spinning
    workers); ``TBRUN_NATIVE_THREADS`` does, and a count that is not a whole number >= 1 says what to write."""
    monkeypatch.delenv(native.THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert native.kernel_threads() == 1
    monkeypatch.setenv(native.THREADS_VARIABLE, "3")
    assert native.kernel_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(native.THREADS_VARIABLE, bad)
        with pytest.raises(ValueError, match="whole number of threads"):
            native.kernel_threads()


@needs_compiler
def test_a_decode_runs_the_kernels_on_the_cores_torch_had_and_torch_on_one(built_native, monkeypatch):
    """``decode_threads``: the kernels take torch's thread count and torch one thread, both restored on exit,
    after an error too; a count set in ``TBRUN_NATIVE_THREADS`` is used as it is and leaves torch its threads;
    with the kernels off, nothing changes. The count is the decoding thread's own: a decode inside it keeps it,
    another thread does not take it."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv(native.THREADS_VARIABLE, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with native.decode_threads():
            assert (native.kernel_threads(), torch.get_num_threads()) == (3, 1)
            with native.decode_threads():  # a decode inside a decode keeps the outer one's threads
                assert (native.kernel_threads(), torch.get_num_threads()) == (3, 1)
            assert (native.kernel_threads(), torch.get_num_threads()) == (3, 1)
            with ThreadPoolExecutor(1) as pool:  # another Python thread (a copy thread's) keeps one kernel thread
                assert pool.submit(native.kernel_threads).result(timeout=60) == 1
        assert (native.kernel_threads(), torch.get_num_threads()) == (1, 3)
        assert native.decode_kernel_threads() == 3
        with pytest.raises(RuntimeError, match="inside"), native.decode_threads():
            raise RuntimeError("inside")
        assert (native.kernel_threads(), torch.get_num_threads()) == (1, 3)
        monkeypatch.setenv(native.THREADS_VARIABLE, "2")
        with native.decode_threads():
            assert (native.kernel_threads(), torch.get_num_threads()) == (2, 3)
        monkeypatch.delenv(native.THREADS_VARIABLE)
        monkeypatch.setenv("TBRUN_NATIVE", "0")
        with native.decode_threads():
            assert torch.get_num_threads() == 3  # torch does the decode's work: it keeps its threads
    finally:
        torch.set_num_threads(before)


def test_the_kernel_variables_follow_the_environment_however_it_changes(monkeypatch):
    """Read from the environment's own mapping and parsed again only when a value changes: a set, a deletion
    and an ``os.environ`` replaced by a plain mapping are all seen at the next call."""
    import os

    monkeypatch.setenv(native.THREADS_VARIABLE, "2")
    assert native.kernel_threads() == 2
    monkeypatch.setenv(native.THREADS_VARIABLE, "3")
    monkeypatch.setenv("TBRUN_NATIVE", "off")
    assert native.kernel_threads() == 3 and not native.enabled()
    monkeypatch.delenv(native.THREADS_VARIABLE)
    monkeypatch.delenv("TBRUN_NATIVE")
    assert native.kernel_threads() == 1 and native.enabled()
    monkeypatch.setattr(os, "environ", {native.THREADS_VARIABLE: "4", "TBRUN_NATIVE": "0"})
    assert native.kernel_threads() == 4 and not native.enabled()

@needs_compiler
def test_a_library_of_other_signatures_is_not_used(fresh_native, monkeypatch, tmp_path):
    """A source edited under a running process (or an old library) must not be called through wrappers
    of other signatures: the library's ABI number is checked, and the torch path runs instead."""
    text = native.SOURCE.read_text()
    assert re.search(r"int tbrun_kernels_abi\(\) \{ return (\d+); \}", text).group(1) == str(native.ABI)
    source = tmp_path / "selection.cpp"
    source.write_text(re.sub(r"(int tbrun_kernels_abi\(\) \{ return )\d+(; \})", r"\g<1>999\2", text))
    monkeypatch.setattr(native, "SOURCE", source)
    native.reset()
    assert native.kernels() is None
    assert "ABI 999" in native.status()
    assert fused_group_scores(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 16, 300)) is None


@needs_compiler
@pytest.mark.parametrize("dtype, threads", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 3)])
def test_the_native_gather_moves_what_index_select_moves(dtype, threads, built_native, monkeypatch):
    """A layer's K and V from a token-major store into a bank's slots: the same bytes as the torch path
    (with 3 threads the plan, over 4,096 rows, is split among them), untouched slots untouched, and an
    entry past a table refused before anything moves."""
    from offload_engine.cpu_cache.gather import gather_pairs

    generator = torch.Generator().manual_seed(7)
    capacity, heads, width, slots = 3000, 3, 64, 2100
    monkeypatch.setenv(native.THREADS_VARIABLE, str(threads))  # what the wrapper passes the kernel
    store_k = torch.randn(capacity, heads, width, generator=generator).to(dtype)
    store_v = torch.randn(capacity, heads, width, generator=generator).to(dtype)
    positions = torch.stack([torch.randperm(capacity, generator=generator)[:slots] for _ in range(heads)])
    targets = torch.stack([torch.randperm(slots + 20, generator=generator)[:slots] for _ in range(heads)])
    counts = torch.tensor([slots, 17, 0])
    results = {}
    for kind in ("native", "torch"):
        monkeypatch.setenv("TBRUN_NATIVE", "1" if kind == "native" else "0")
        native.reset()
        bank = torch.full((2, heads, slots + 21, width), -7.0, dtype=dtype)  # a working set's K and V
        gather_pairs([(store_k.transpose(0, 1), bank[0]), (store_v.transpose(0, 1), bank[1])], positions, targets,
                     counts=counts)
        results[kind] = bank
    assert torch.equal(results["native"], results["torch"])
    assert (results["native"][:, 2] == -7).all()  # a head with count 0 moved nothing
    assert ((results["native"][:, 1] != -7).any(dim=-1).sum(dim=-1) == 17).all()

    monkeypatch.setenv("TBRUN_NATIVE", "1")
    native.reset()
    bank = torch.zeros(2, heads, slots + 21, width, dtype=dtype)
    bad = positions.clone()
    bad[2, 5] = capacity  # one row past the store, in the last head: found before the first copy
    with pytest.raises(IndexError, match="nothing was copied"):
        native.kernels().gather_pairs([(store_k.transpose(0, 1), bank[0]), (store_v.transpose(0, 1), bank[1])],
                                      bad, targets, None)
    assert (bank == 0).all()


def test_auto_keys_are_int8_or_bfloat16_on_the_cpu_only_where_the_kernel_reads_them(built_native, monkeypatch):
    """A float32 model's compact keys on the CPU: with the native kernels int8 where they multiply int8 codes
    in integer quads (AVX512-VNNI), else bfloat16; float32 without the kernels (torch would convert them every
    call); other dtypes and devices keep the model's; explicit ones win."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert native.kernels() is not None, native.status()
    quads = native.kernels().int8_quad_products
    assert compact_key_dtype("auto", torch.float32, cpu) == (torch.int8 if quads else torch.bfloat16)
    assert compact_key_dtype("auto", torch.float32, cuda) == torch.float32
    assert compact_key_dtype("auto", torch.float16, cuda) == torch.float16
    assert compact_key_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert compact_key_dtype("float32", torch.float32, cpu) == torch.float32
    assert compact_key_dtype("bfloat16", torch.float16, cuda) == torch.bfloat16
    assert compact_key_dtype("int8", torch.float16, cuda) == torch.int8
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    assert compact_key_dtype("auto", torch.float32, cpu) == torch.float32


@needs_compiler
@pytest.mark.parametrize("hidden, inner, out, bias", [
    (576, 128, 288, True),  # SmolLM2's producer at G = 2, I = 128
    (37, 19, 23, True),     # no size a multiple of the vector width: every tail runs
    (64, 32, 16, False),    # a norm without bias
])
def test_the_native_query_network_is_the_predictors(hidden, inner, out, bias, built_native):
    """``query_mlp`` computes ``predictor.network.query_mlp`` (LayerNorm, Linear, SiLU, Linear) for one token."""
    from offload_engine.predictor.network import query_mlp

    kernels = native.kernels()
    assert kernels is not None, native.status()
    torch.manual_seed(hidden)
    mlp = query_mlp(hidden, inner, out)
    norm, first, _, second = mlp
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
        if not bias:
            norm.bias = None
    x = torch.randn(hidden) * 4 + 2  # a mean and a spread for the norm to take out
    got = kernels.query_mlp(x, norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), norm.eps,
                            first.weight.detach(), second.weight.detach())
    with torch.no_grad():
        expected = mlp(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_native_query_network_refuses_shapes_that_do_not_chain(built_native):
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    with pytest.raises(ValueError, match="do not chain"):
        kernels.query_mlp(torch.randn(8), torch.ones(8), None, 1e-5, torch.randn(4, 9), torch.randn(3, 4))
    with pytest.raises(TypeError, match="float32"):
        kernels.query_mlp(torch.randn(8).double(), torch.ones(8), None, 1e-5, torch.randn(4, 8), torch.randn(3, 4))


@needs_compiler
@pytest.mark.parametrize("layers, kv_heads, group, dim, tokens", [
    (2, 3, 3, 16, 5000),   # SmolLM2's shape at G = 2, the reference's max rule
    (2, 3, 1, 16, 5000),   # one predictor query head per KV head: the logits themselves
    (1, 2, 7, 8, 700),     # a group of 7: blocks of 4 and 3
    (1, 1, 1, 5, 33),      # odd d', a scalar tail
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_gives_torchs_group_max_of_logits(layers, kv_heads, group, dim, tokens, dtype, built_native):
    """The max rule: the largest query-head logit per token, as torch's matmul and amax give it (bfloat16
    keys against the query rounded to bfloat16 where the kernel takes pair products)."""
    generator = torch.Generator().manual_seed(tokens + dim + group)
    cache = ProjectedKeyCache(layers, kv_heads, tokens + 37, dim, dtype, torch.device("cpu"))
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator) * 2)
    keys = cache.columns(range(1, layers + 1), 0, tokens)
    grouped = torch.randn(layers, kv_heads, group, dim, generator=generator)
    fused = fused_group_scores(grouped, keys, "max")
    assert fused is not None, native.status()
    expected = torch.matmul(_as_scored(grouped, dtype), keys.float()).amax(dim=-2)
    assert fused.shape == expected.shape == (layers, kv_heads, tokens)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="reduction must be one of"):
        native.kernels().group_scores(grouped.reshape(layers * kv_heads, group, dim), keys.reshape(-1, dim, tokens),
                                      "sum")


def _random_cache(layers: int, kv_heads: int, capacity: int, dim: int, dtype: torch.dtype,
                  generator: torch.Generator) -> ProjectedKeyCache:
    """A compact cache of random keys: ``_int8_cache`` for int8, else normal keys of std 2 in ``dtype``."""
    if dtype == torch.int8:
        return _int8_cache(layers, kv_heads, capacity, dim, generator)
    cache = ProjectedKeyCache(layers, kv_heads, capacity, dim, dtype, torch.device("cpu"))
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator) * 2)
    return cache


def _int8_cache(layers: int, kv_heads: int, capacity: int, dim: int, generator: torch.Generator) -> ProjectedKeyCache:
    """An int8 compact cache of random codes and scales: normal float16 scales, subnormal ones (the keys of
    a token near zero) and zeros."""
    cache = ProjectedKeyCache(layers, kv_heads, capacity, dim, torch.int8, torch.device("cpu"))
    cache.keys.copy_(torch.randint(-127, 128, cache.keys.shape, generator=generator, dtype=torch.int8))
    scales = torch.rand(cache.scales.shape, generator=generator) * 0.05
    tiny = torch.rand(cache.scales.shape, generator=generator) < 0.1
    scales = torch.where(tiny, scales * 1e-3, scales)  # below 6.1e-5: float16 subnormals
    scales[..., ::97] = 0.0
    cache.scales.copy_(scales.half())
    return cache


@needs_compiler
@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("layers, kv_heads, group, dim, tokens", [
    (2, 3, 3, 16, 5000),   # SmolLM2's producer with its 3 query heads per KV head
    (2, 3, 1, 16, 5000),   # one query head per KV head: the logits themselves under the max rule
    (1, 2, 7, 8, 700),     # Qwen2.5-0.5B's group
    (1, 2, 5, 5, 33),      # odd d', two vectors of 16 tokens and a scalar tail
])
def test_the_kernel_scores_int8_keys_as_torch_does_with_their_scales(layers, kv_heads, group, dim, tokens, reduction,
                                                                   built_native):
    """int8 codes with one float16 scale per token: each token's logits are the codes' times its scale (the
    scales widened exactly, subnormals and zeros included), then the group's rule, as torch computes them
    against the query as the kernel takes it: quantised to int8 where it multiplies codes in integer quads
    (AVX512-VNNI, d' a multiple of 4: then, as a check that the integer kernel ran, not the float query's
    scores), else the float32 query. 5,000 tokens: whole tiles of 64-token blocks, each token's place in
    the quads' interleaving, and the tail."""
    generator = torch.Generator().manual_seed(tokens + group + dim)
    cache = _int8_cache(layers, kv_heads, tokens + 37, dim, generator)
    keys = cache.columns(range(1, layers + 1), 0, tokens)
    scales = cache.scales[0:layers, :, :tokens]
    grouped = torch.randn(layers, kv_heads, group, dim, generator=generator)
    fused = fused_group_scores(grouped, keys, reduction, scales)
    assert fused is not None, native.status()

    def scores(queries: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(queries, keys.float()) * scales.float().unsqueeze(-2)
        return logits.amax(dim=-2) if reduction == "max" else group_mean_probabilities(logits)

    # logits up to ~100 summed in another order: a few ulps of the products where they cancel to near 0
    tolerance = {"rtol": 2e-5, "atol": 1e-5 if reduction == "max" else 1e-6}
    torch.testing.assert_close(fused, scores(_as_scored(grouped, torch.int8)), **tolerance)
    if dim % 4 == 0 and native.kernels().int8_quad_products:
        assert not torch.allclose(fused, scores(grouped), **tolerance)
    assert fused_group_scores(grouped, keys, reduction) is None  # int8 keys without their scales: not scored


@needs_compiler
def test_an_int8_tokens_logit_is_the_same_number_wherever_a_span_starts(built_native):
    """The max rule scores a range from its first candidate (one call), the scores kernel from position 0 (three
    calls): a token's logit must not depend on where its 64-token block of the span began (the integer blocks
    and the tail after them take the same integer dot product), or the two would rank near ties apart. Keys
    scored from 0 and from 5: the same tokens' scores are equal bit for bit."""
    generator = torch.Generator().manual_seed(21)
    cache = _int8_cache(1, 2, 1400, 16, generator)
    keys, scales = cache.columns(range(1, 2), 0, 1300), cache.scales[0:1, :, :1300]
    grouped = torch.randn(1, 2, 3, 16, generator=generator)
    whole = fused_group_scores(grouped, keys, "max", scales)
    shifted = fused_group_scores(grouped, keys[..., 5:], "max", scales[..., 5:])
    assert torch.equal(whole[..., 5:], shifted)


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set levels only")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_the_scores_are_the_same_on_cpus_without_avx512(march, fresh_native, monkeypatch):
    """The library built for an older x86 CPU (AVX2 and F16C; or neither): the int8 codes, float16 scales and
    bfloat16 keys take the other loads, and give torch's scores as on this machine; the top-k and the
    residency update take their scalar loops and select and place what they do here."""
    monkeypatch.setattr(native, "FLAGS", tuple(f"-march={march}" if flag == "-march=native" else flag
                                               for flag in native.FLAGS))
    generator = torch.Generator().manual_seed(7)
    cache = _int8_cache(2, 3, 1100, 16, generator)
    keys, scales = cache.columns(range(1, 3), 0, 1061), cache.scales[0:2, :, :1061]
    grouped = torch.randn(2, 3, 3, 16, generator=generator)
    fused = fused_group_scores(grouped, keys, "mean", scales)
    assert fused is not None, native.status()
    assert f"-march={march}" in native.FLAGS and not native.kernels().bf16_pair_products
    assert not native.kernels().int8_quad_products  # the float32 query against the widened codes
    _assert_int8_writes_are_quantize_keys(native.kernels())  # float16 scales rounded without F16C ("x86-64")
    logits = torch.matmul(grouped, keys.float()) * scales.float().unsqueeze(-2)
    torch.testing.assert_close(fused, group_mean_probabilities(logits), rtol=2e-5, atol=1e-6)
    halves = torch.randn(2, 3, 16, 1061, generator=generator).bfloat16()
    torch.testing.assert_close(fused_group_scores(grouped, halves, "max"),
                               torch.matmul(grouped, halves.float()).amax(dim=-2), rtol=1e-5, atol=1e-4)
    # the top-k's and the residency update's scalar loops: one call as the three, a long row sampled
    _assert_one_call_is_three(2, 3, 3, 16, 5000, 4, 480, 500, torch.bfloat16, "mean")
    clustered = (torch.arange(0, 6000, dtype=torch.int32) * 3 + 0x3F000000).view(torch.float32)  # 0.5 + 3k ulp
    clustered = clustered[torch.randperm(6000, generator=generator)].view(1, -1)
    for keep in (1, 1200, 5999):
        assert set(native.kernels().topk_rows(clustered, keep)[1][0].tolist()) == \
            set(torch.topk(clustered, keep).indices[0].tolist())


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set levels only")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_a_linear_from_gguf_blocks_is_the_float32_one_on_cpus_without_avx512(march, fresh_native, monkeypatch):
    """Built for an older x86 CPU (AVX2 and F16C; or neither), the q4_1 and q8_0 blocks widen by the other loads
    (no code-table lookup) and still give the float32 product bit for bit (gguf_weights)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    monkeypatch.setattr(native, "FLAGS", tuple(f"-march={march}" if flag == "-march=native" else flag
                                               for flag in native.FLAGS))
    kernels = native.kernels()
    assert kernels is not None and f"-march={march}" in native.FLAGS, native.status()
    values = np.random.default_rng(4).standard_normal((70, 96)).astype(np.float32)
    x = torch.randn(96, generator=torch.Generator().manual_seed(4))
    for name, kind in (("q4_1", GGMLQuantizationType.Q4_1), ("q8_0", GGMLQuantizationType.Q8_0)):
        raw = quants.quantize(values, kind)
        weight = torch.from_numpy(quants.dequantize(raw, kind).astype(np.float32))
        from_floats = kernels.linear(x, weight.clone(), None)
        native.attach_weight_blocks(weight, native.WeightBlocks(name, torch.from_numpy(raw.copy())))
        assert torch.equal(kernels.linear(x, weight, None), from_floats), name
        torch.testing.assert_close(from_floats, weight @ x, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("layers, kv_heads, group, dim, tokens, lo, keep, slots", [
    (2, 3, 3, 16, 5000, 4, 480, 500),   # SmolLM2's producer at G = 2: a long row, the sampled top-k cut
    (2, 3, 3, 16, 12000, 4, 1000, 1100),  # 72k candidates, past SELECT_THREADED_ENTRIES (65,536): rows threaded
    (1, 2, 7, 8, 300, 2, 40, 40),       # Qwen2.5's group of 7, every slot used
    (3, 1, 1, 5, 37, 1, 30, 64),        # one query head, odd d', a scalar tail, keep close to the candidates
])
def test_one_call_selects_and_places_what_the_three_calls_do(layers, kv_heads, group, dim, tokens, lo, keep, slots,
                                                              dtype, threads, reduction, built_native, monkeypatch):
    """ResidencyMap.select (scores, top-k and residency update in one native call) against the steps it
    replaces (the scores kernel, topk_positions, ResidencyMap.update), step after step on two maps: the
    same plans, slot maps and masks. The query drifts a little each step, so part of the selection stays."""
    monkeypatch.setenv(native.THREADS_VARIABLE, str(threads))
    _assert_one_call_is_three(layers, kv_heads, group, dim, tokens, lo, keep, slots, dtype, reduction)


@needs_compiler
@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("layers, kv_heads, group, dim, tokens, lo, keep, slots", [
    (2, 3, 3, 16, 5000, 4, 480, 500), (3, 1, 1, 5, 37, 1, 30, 64)])
def test_one_call_raises_held_positions_as_torch_does(layers, kv_heads, group, dim, tokens, lo, keep, slots, dtype,
                                                       reduction, built_native):
    """With the top-k's hysteresis (--keep-bonus: the scores of positions held in a slot times 1 + b, or plus
    log(1 + b) for logits), the one native call selects and places what favour_held, topk_positions and
    ResidencyMap.update do in torch, step after step; and it renews less of the previous selection than without."""
    renewed = {bonus: _assert_one_call_is_three(layers, kv_heads, group, dim, tokens, lo, keep, slots, dtype, reduction,
                                                keep_bonus=bonus) for bonus in (0.0, 0.5)}
    assert renewed[0.5] <= renewed[0.0]
    if keep < tokens // 4:  # a choice among many candidates: the bonus keeps some of what the drift would renew
        assert renewed[0.5] < renewed[0.0]


class _Scored:
    """A stand-in base for CriticalPolicy.reweight: only its kind of scores matters there."""

    def __init__(self, kind: str):
        self.score_kind = kind


@needs_compiler
@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("keep_bonus, norms_dtype, threads, alpha", [
    (0.0, torch.float32, 1, 0.5), (0.5, torch.float32, 1, 0.5), (0.5, torch.bfloat16, 2, 0.5),
    (0.5, torch.float32, 1, 1.0), (0.0, torch.float32, 1, 0.0)])
@pytest.mark.parametrize("layers, kv_heads, group, dim, tokens, lo, keep, slots", [
    (2, 3, 3, 16, 5000, 4, 480, 500), (2, 3, 3, 16, 12000, 4, 1000, 1100), (3, 1, 1, 5, 37, 1, 30, 64)])
def test_one_call_selects_critical_two_stages_as_its_torch_form(layers, kv_heads, group, dim, tokens, lo, keep, slots,
                                                               dtype, reduction, keep_bonus, norms_dtype, threads,
                                                               alpha, built_native, monkeypatch):
    """critical(...) over a producer's scores in the one native call (``native.Reweight``: value norms, alpha,
    eps, each stage's keep bonus) selects and places, step after step, what CriticalPolicy.reweight, the top-k
    and ResidencyMap.update do in torch: masses (the mean rule) and logits (the max rule), float32 and bfloat16
    norms, with the bonus on held positions, rows threaded past SELECT_THREADED_ENTRIES, and alpha 1 (the first
    stage is the selection, ordered by the combined scores, which float32 rounding ties) and 0 (no first stage)."""
    from offload_engine.policies.base import Candidates
    from offload_engine.policies.critical import CriticalPolicy
    from offload_engine.selection.ranking import held_terms, topk_positions
    from offload_engine.selection.residency import ResidencyMap
    from offload_engine.selection.scores import GroupScores

    monkeypatch.setenv(native.THREADS_VARIABLE, str(threads))
    generator = torch.Generator().manual_seed(tokens + keep + int(keep_bonus * 10))
    rows, capacity = layers * kv_heads, tokens + 40
    cache = _random_cache(layers, kv_heads, capacity, dim, dtype, generator)
    kind = "logit" if reduction == "max" else "mass"
    critical = CriticalPolicy(base=_Scored(kind), alpha=alpha)
    critical.norms = (torch.rand(layers, kv_heads, capacity, generator=generator) * 4).to(norms_dtype)
    fused_map, reference_map = (ResidencyMap(rows + 2, slots, torch.device("cpu"), capacity) for _ in range(2))
    part = slice(1, rows + 1)
    critical.keeps_held(lambda span, c: reference_map.held(part, c.lo, c.hi), keep_bonus)
    first, second = critical._terms if keep_bonus else (None, None)
    assert (first, second) == ((held_terms(keep_bonus, kind), held_terms(keep_bonus, "mass")) if keep_bonus
                               else (None, None))
    reweight = native.Reweight(critical.norms.flatten(0, 1), critical.alpha, critical.eps, kind, first, second)
    query = torch.randn(layers, kv_heads, group, dim, generator=generator)
    for step in range(4):
        query = query + 0.3 * torch.randn(query.shape, generator=generator)
        hi = tokens - 6 + step
        scales = cache.scales[0:layers] if cache.int8 else None
        scores = GroupScores(query, cache.keys[0:layers], lo, hi, reduction, scales, tokens=hi + 3)
        queries, keys, row_scales = scores.native_rows()
        bound = fused_map.bind_select(part, keys, reduction, row_scales, reweight=reweight)
        assert bound is not None and fused_map.accepts(bound, hi + 3, lo, hi, keep)
        fused = fused_map.prepare_bound(bound, queries.contiguous(), hi + 3, lo, hi, keep)()
        combined = critical.reweight(range(0, layers), scores.compute(), Candidates(lo, hi, keep, hi + 2))
        reference = reference_map.update(topk_positions(combined, keep, lo, ordered=False).flatten(0, 1), part)
        for field in ("positions", "slots", "counts"):
            assert torch.equal(getattr(fused, field), getattr(reference, field)), (step, field)
        for field in ("slot_pos", "slot_of", "active"):
            assert torch.equal(getattr(fused_map, field), getattr(reference_map, field)), (step, field)
        assert 0 < int(fused.counts.sum()) <= rows * keep


def _assert_one_call_is_three(layers, kv_heads, group, dim, tokens, lo, keep, slots, dtype, reduction,
                              keep_bonus: float = 0.0) -> int:
    """-> the positions fetched over the steps after the first (what the selections renewed)."""
    from offload_engine.selection.ranking import favour_held, held_terms, topk_positions
    from offload_engine.selection.residency import ResidencyMap
    from offload_engine.selection.scores import GroupScores

    generator = torch.Generator().manual_seed(tokens + keep)
    rows, capacity = layers * kv_heads, tokens + 40
    cache = _random_cache(layers, kv_heads, capacity, dim, dtype, generator)
    fused_map, reference_map = (ResidencyMap(rows + 2, slots, torch.device("cpu"), capacity) for _ in range(2))
    part = slice(1, rows + 1)  # the producer's rows inside a bigger bank
    query = torch.randn(layers, kv_heads, group, dim, generator=generator)
    renewed = 0
    for step in range(5):
        query = query + 0.3 * torch.randn(query.shape, generator=generator)
        hi = tokens - 6 + step  # the sequence grows
        if step % 2:  # the cache's columns of the step's tokens (a view of another shape at every step)
            scales = cache.scales[0:layers, :, : hi + 3] if cache.int8 else None
            scores = GroupScores(query, cache.columns(range(1, layers + 1), 0, hi + 3), lo, hi, reduction, scales)
        else:  # its whole capacity and how many tokens the step has, as TokenButlerPolicy describes them
            scales = cache.scales[0:layers] if cache.int8 else None
            scores = GroupScores(query, cache.keys[0:layers], lo, hi, reduction, scales, tokens=hi + 3)
        held = held_terms(keep_bonus, "logit" if reduction == "max" else "mass")
        fused = fused_map.select(scores, keep, part, held)
        ranked = scores.compute()
        if held is not None:
            ranked = favour_held(ranked, reference_map.held(part, lo, hi).view(ranked.shape), held)
        chosen = topk_positions(ranked, keep, lo, ordered=False).flatten(0, 1)
        reference = reference_map.update(chosen, part)
        assert fused is not None
        for field in ("positions", "slots", "counts"):
            assert torch.equal(getattr(fused, field), getattr(reference, field)), (step, field)
        for field in ("slot_pos", "slot_of", "active"):
            assert torch.equal(getattr(fused_map, field), getattr(reference_map, field)), (step, field)
        assert 0 < int(fused.counts.sum()) <= rows * keep
        # [rows, width] contiguous (the kernel moves the rows to that stride): a layer's gather takes its rows
        # as they are, with no copy
        assert fused.positions.is_contiguous() and fused.slots.is_contiguous()
        assert fused.positions.shape == (rows, int(fused.counts.max()))
        renewed += int(fused.counts.sum()) if step else 0
    return renewed


@needs_compiler
def test_a_residency_map_binds_a_rows_selection_once_for_the_keys_it_reads(built_native, monkeypatch):
    """prepare_select binds the one-call selection of a slice of rows once (its keys' layout and the tables
    checked then) and reuses it while the keys are the same memory and layout; other keys, another rule or
    another slice of rows bind anew, and every step selects what the separate steps select."""
    from offload_engine.selection.ranking import topk_positions
    from offload_engine.selection.residency import ResidencyMap
    from offload_engine.selection.scores import GroupScores

    binds = []
    original = native.SelectionKernels.bind_select_rows
    monkeypatch.setattr(native.SelectionKernels, "bind_select_rows", lambda self, *a: binds.append(1) or original(self, *a))
    generator = torch.Generator().manual_seed(5)
    cache = ProjectedKeyCache(2, 2, 200, 8, torch.bfloat16, torch.device("cpu"))
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator))
    other = ProjectedKeyCache(2, 2, 200, 8, torch.bfloat16, torch.device("cpu"))
    other.keys.copy_(torch.randn(other.keys.shape, generator=generator))
    fused_map, reference_map = (ResidencyMap(6, 16, torch.device("cpu"), 200) for _ in range(2))
    steps = [(cache, "mean", slice(0, 4), 1), (cache, "mean", slice(0, 4), 1), (cache, "mean", slice(0, 4), 1),
             (other, "mean", slice(0, 4), 2), (other, "max", slice(0, 4), 3), (other, "max", slice(2, 6), 4),
             (other, "max", slice(0, 4), 4)]  # (keys, rule, rows, binds made so far)
    for step, (keys, reduction, rows, bound) in enumerate(steps):
        query = torch.randn(2, 2, 3, 8, generator=generator)
        scores = GroupScores(query, keys.keys[0:2], 4, 100 + step, reduction, tokens=103 + step)
        fused = fused_map.select(scores, 12, rows)
        reference = reference_map.update(topk_positions(scores.compute(), 12, 4, ordered=False).flatten(0, 1), rows)
        assert len(binds) == bound, step
        for field in ("positions", "slots", "counts"):
            assert torch.equal(getattr(fused, field), getattr(reference, field)), (step, field)
        assert torch.equal(fused_map.slot_pos, reference_map.slot_pos) and torch.equal(fused_map.active, reference_map.active)


@needs_compiler
def test_one_call_selection_declines_what_it_does_not_do(built_native, monkeypatch):
    """None, with the map untouched, where the caller must take the separate steps: nothing to keep, more
    than the slots, positions past the map's capacity, a map kept off the host, the kernels switched off."""
    from offload_engine.selection.residency import ResidencyMap
    from offload_engine.selection.scores import GroupScores

    keys = torch.randn(1, 2, 8, 100)
    scores = GroupScores(torch.randn(1, 2, 2, 8), keys, 4, 90)
    rmap = ResidencyMap(2, 16, torch.device("cpu"), 128)
    before = rmap.slot_pos.clone()
    assert rmap.select(scores, 0, slice(None)) is None
    assert rmap.select(scores, 17, slice(None)) is None  # more than the 16 slots
    assert ResidencyMap(2, 16, torch.device("cpu"), 80).select(scores, 8, slice(None)) is None  # hi 90 > 80
    assert ResidencyMap(2, 16, torch.device("cpu"), 128, on_host=False).select(scores, 8, slice(None)) is None
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    native.reset()
    assert rmap.select(scores, 8, slice(None)) is None
    assert torch.equal(rmap.slot_pos, before) and rmap.appending
    monkeypatch.setenv("TBRUN_NATIVE", "1")
    native.reset()
    assert rmap.select(scores, 8, slice(None)).counts.tolist() == [8, 8]


def test_one_call_selection_refuses_bad_arguments(built_native):
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    import numpy as np

    queries, keys = torch.randn(2, 3, 8), torch.randn(2, 8, 50)
    tables = (np.full((2, 9), -1), np.full((2, 61), -1, dtype=np.int32), np.zeros((2, 9), dtype=bool))
    with pytest.raises(ValueError, match="needs 0 < keep <= hi - lo"):
        kernels.select_rows(queries, keys, 4, 10, 7, *tables)  # 7 of 6 candidates
    with pytest.raises(ValueError, match="needs 0 < keep <= hi - lo"):
        kernels.select_rows(queries, keys, 4, 40, 9, *tables)  # 9 of 8 slots
    with pytest.raises(ValueError, match="do not match"):
        kernels.select_rows(queries, torch.randn(2, 4, 50), 4, 40, 5, *tables)
    with pytest.raises(TypeError, match="float32"):
        kernels.select_rows(queries.double(), keys, 4, 40, 5, *tables)
    codes = torch.zeros(2, 8, 50, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 keys need their scales"):
        kernels.select_rows(queries, codes, 4, 40, 5, *tables)
    with pytest.raises(TypeError, match="int8 keys need their scales"):
        kernels.select_rows(queries, keys, 4, 40, 5, *tables, scales=torch.ones(2, 50).half())
    with pytest.raises(ValueError, match="scales"):
        kernels.select_rows(queries, codes, 4, 40, 5, *tables, scales=torch.ones(2, 49).half())  # short of m = 50


@needs_compiler
@pytest.mark.parametrize("rows, cols, bias, shape", [
    (288, 576, False, (576,)),        # SmolLM2's attention projections, a bare vector
    (37, 19, True, (1, 1, 19)),       # no size a multiple of the vector width; the adapter's [1, T, E]
    (1, 1, True, (1, 1)),
    (1024, 4096, True, (1, 4096)),    # 4M entries: split among threads where there are several
])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_native_linear_is_torchs_for_one_token(rows, cols, bias, shape, threads, built_native, monkeypatch):
    """``linear`` computes ``F.linear`` for one token, at any thread count, in the input's leading shape."""
    monkeypatch.setenv(native.THREADS_VARIABLE, threads)
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(rows + cols)
    weight = torch.randn(rows, cols, generator=generator)
    b = torch.randn(rows, generator=generator) if bias else None
    x = torch.randn(shape, generator=generator)
    got = kernels.linear(x, weight, b)
    assert got is not None and got.shape == (*shape[:-1], rows)
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    magnitude = torch.nn.functional.linear(x.double().abs(), weight.double().abs(), None if b is None else b.double().abs())
    assert ((got.double() - exact).abs() <= 1e-6 * magnitude + 1e-7).all()  # float32 rounding of a sum, no more


def test_the_native_linear_declines_what_it_does_not_compute(built_native):
    """More than one token, another dtype, a strided weight or bias, a mismatched width, or a product that
    needs a gradient: None, and the caller runs torch."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    weight, x = torch.randn(8, 6), torch.randn(1, 1, 6)
    assert kernels.linear(x, weight, None) is not None
    declined = {
        "two tokens": (torch.randn(1, 2, 6), weight, None),
        "bfloat16": (x.bfloat16(), weight.bfloat16(), None),
        "float64 weight": (x, weight.double(), None),
        "strided weight": (x, torch.randn(6, 8).t(), None),
        "width": (torch.randn(1, 1, 5), weight, None),
        "reshaped token": (torch.randn(2, 3), weight, None),
        "bias length": (x, weight, torch.randn(7)),
        "gradient": (x, weight.clone().requires_grad_(), None),
    }
    for name, (xs, w, b) in declined.items():
        assert kernels.linear(xs, w, b) is None, name
    with torch.no_grad():  # no gradient wanted: the kernel runs
        assert kernels.linear(x, weight.clone().requires_grad_(), None) is not None


@needs_compiler
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_a_decode_step_takes_the_native_kernels_and_keeps_the_logits(arch, built_native, monkeypatch):
    """A one-token step of Llama, Qwen2 and Qwen3 runs each layer in the two calls of its bound ``DecodeLayer``
    (norms, q/k/v with Qwen2's biases and Qwen3's per-head norms, RoPE; o, residual, norm, MLP); Gemma 3 (sandwich
    norms) piece by piece: every projection by ``linear`` (q, k, v, o) or ``gated_mlp``, every RMS norm (the q/k
    and sandwich norms too) and the RoPE by their kernels. The LM head and the final norm by theirs in both. The
    logits are torch's to float rounding; ``TBRUN_NATIVE=0`` keeps torch's."""
    from offload_engine import Engine, EngineConfig, KVMode
    from offload_engine.models import ModelAdapter

    from tiny_models import tiny_model

    calls: dict[str, list] = {"linear": [], "gated_mlp": [], "rms_norm": [], "rope": [], "input": [], "output": []}

    def counting(owner, name):
        original = getattr(owner, name)

        def counted(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if out is not None:  # the prompt's (several tokens) are declined
                calls[name].append(args[1].shape if name == "linear" else None)
            return out
        return counted

    for name in calls:
        owner = native.DecodeLayer if name in ("input", "output") else native.SelectionKernels
        monkeypatch.setattr(owner, name, counting(owner, name))
    model = tiny_model(arch, initializer_range=0.2)
    prompt = torch.randint(1, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))

    def run():
        engine = Engine(ModelAdapter(model), EngineConfig(context=32, mode=KVMode.DENSE_DEVICE))
        return engine.score_continuation(prompt.tolist()[:6], prompt.tolist()[6:], keep_logits=True).logits

    native_logits = run()
    layers, steps = model.config.num_hidden_layers, 5
    norms_per_layer = {"llama": 2, "qwen2": 2, "qwen3": 4, "gemma3": 6}[arch]  # gemma3: q/k norms and sandwich
    prompt_norms = norms_per_layer * layers + 1  # the prompt's six tokens: a few values, under the kernel's limit
    assert (model.config.vocab_size, model.config.hidden_size) in calls["linear"]  # the LM head
    if arch == "gemma3":
        assert len(calls["linear"]) == steps * (4 * layers + 1) + 1  # q, k, v, o and the head; the prefill's head
        assert len(calls["gated_mlp"]) == len(calls["rope"]) == steps * layers
        assert len(calls["rms_norm"]) == prompt_norms + steps * (norms_per_layer * layers + 1)
        assert calls["input"] == calls["output"] == []
    else:
        assert len(calls["input"]) == len(calls["output"]) == steps * layers
        assert len(calls["linear"]) == steps + 1 and calls["gated_mlp"] == calls["rope"] == []
        assert len(calls["rms_norm"]) == prompt_norms + steps  # the final norm at each step
    monkeypatch.setenv("TBRUN_NATIVE", "0")
    native.reset()
    for made in calls.values():
        made.clear()
    torch_logits = run()
    assert all(made == [] for made in calls.values())
    torch.testing.assert_close(native_logits, torch_logits, rtol=1e-4, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 1, 4, 64), (3, 7)])
@pytest.mark.parametrize("added", [False, True])
def test_the_native_rms_norm_is_transformers_for_one_token(offset, shape, added, built_native):
    """``rms_norm`` computes transformers' Llama RMSNorm (offset 0) and Gemma 3's (offset 1) row by row, to
    float rounding of the mean of squares; with ``add`` the residual sum first (returned, exact)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(len(shape))
    norm = (LlamaRMSNorm if offset == 0 else Gemma3RMSNorm)(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=generator))
        x = 3 * torch.randn(shape, generator=generator)
        add = torch.randn(shape, generator=generator) if added else None
        out, total = kernels.rms_norm(x, norm.weight, offset, 1e-5, add=add)
        expected_total = x + add if added else x
        assert torch.equal(total, expected_total) and out.shape == x.shape
        torch.testing.assert_close(out, norm(expected_total), rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 16), (2, 1, 128)])
def test_the_native_rope_is_transformers_apply_rotary_pos_emb(heads, kv_heads, dim, built_native):
    """``rope`` turns one token's q and k heads as transformers' ``apply_rotary_pos_emb`` does with the
    position's (cos, sin) row, to float rounding (the products may be fused into the sum)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(dim)
    q = torch.randn(1, 1, heads, dim, generator=generator).transpose(1, 2)  # as the adapter views them
    k = torch.randn(1, 1, kv_heads, dim, generator=generator).transpose(1, 2)
    angles = 1000 * torch.rand(1, 1, dim // 2, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    turned = kernels.rope(q, k, cos, sin)
    assert turned is not None
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    for got, want, source in zip(turned, expected, (q, k)):
        assert got.shape == source.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_native_gated_mlp_is_torchs_for_one_token(activation, residual, threads, built_native, monkeypatch):
    """``gated_mlp`` = ``down(act(gate x) * up x)`` (+ residual) for one token, at any thread count (the
    large matrices' rows split among threads), in the input's leading shape."""
    monkeypatch.setenv(native.THREADS_VARIABLE, threads)
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(7)
    width, inner = 96, (1 << 22) // 96 + 8  # big enough for linear's threaded rows
    gate, up = torch.randn(inner, width, generator=generator), torch.randn(inner, width, generator=generator)
    down = torch.randn(width, inner, generator=generator) / inner ** 0.5
    x = torch.randn(1, 1, width, generator=generator)
    added = torch.randn(1, 1, width, generator=generator) if residual else None
    act = torch.nn.functional.silu if activation == "silu" else (
        lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
    got = kernels.gated_mlp(x, gate, up, down, activation, added)
    assert got is not None and got.shape == (1, 1, width)
    hidden = act(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    expected = hidden @ down.double().T + (added.double() if residual else 0)
    magnitude = hidden.abs() @ down.double().abs().T + 1
    assert ((got.double() - expected).abs() <= 1e-5 * magnitude).all()


def test_the_one_token_kernels_decline_what_they_do_not_compute(built_native):
    """More values than a token's, another dtype, a gradient, a mismatched width or shape, an odd head
    dimension, more than one token, an activation the kernel lacks: None, and the caller runs torch."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    weight, x = torch.randn(8), torch.randn(1, 1, 8)
    assert kernels.rms_norm(x, weight, 0.0, 1e-6) is not None
    norms = {
        "a prefill's values": (torch.randn(1, native.TOKEN_MAX_ENTRIES // 8 + 1, 8), weight, None),
        "bfloat16": (x.bfloat16(), weight, None),
        "width": (torch.randn(1, 1, 7), weight, None),
        "added shape": (x, weight, torch.randn(1, 2, 8)),
        "gradient": (x, weight.clone().requires_grad_(), None),
    }
    for name, (xs, w, add) in norms.items():
        assert kernels.rms_norm(xs, w, 0.0, 1e-6, add=add) is None, name
    q, k, table = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 1, 8)
    assert kernels.rope(q, k, table, table) is not None
    ropes = {
        "two tokens": (torch.randn(1, 4, 2, 8), torch.randn(1, 2, 2, 8), table),
        "odd head dimension": (torch.randn(1, 4, 1, 7), torch.randn(1, 2, 1, 7), torch.randn(1, 1, 7)),
        "partial rotary": (q, k, torch.randn(1, 1, 4)),
        "bfloat16": (q.bfloat16(), k.bfloat16(), table),
    }
    for name, (qs, ks, t) in ropes.items():
        assert kernels.rope(qs, ks, t, t) is None, name
    gate, down = torch.randn(16, 8), torch.randn(8, 16)
    assert kernels.gated_mlp(x, gate, gate, down, "silu") is not None
    mlps = {
        "relu": (x, gate, down, "relu", None),
        "two tokens": (torch.randn(1, 2, 8), gate, down, "silu", None),
        "strided gate": (x, torch.randn(8, 16).t(), down, "silu", None),
        "down width": (x, gate, torch.randn(8, 15), "silu", None),
        "residual shape": (x, gate, down, "silu", torch.randn(1, 1, 9)),
    }
    for name, (xs, g, d, act, residual) in mlps.items():
        assert kernels.gated_mlp(xs, g, g, d, act, residual) is None, name


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads, head_dim, dim", [(3, 64, 16), (2, 7, 5), (1, 128, 256)])
def test_the_key_writer_writes_each_heads_projected_key_into_its_cache_column(dtype, kv_heads, head_dim, dim,
                                                                              built_native):
    """BoundKeyWriter: keys[layer, h, :, position] = k[h] @ projections[layer, h] for one layer and position
    of a padded cache (the compact cache's strides), float32 to rounding and bfloat16 as torch rounds it (to one
    ulp: the sums' order differs), nothing else written; a key it does not read is left to the caller (False),
    a layer or position out of range raises, and tensors it cannot write are not bound."""
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(kv_heads * head_dim + dim)
    cache = ProjectedKeyCache(3, kv_heads, 40, dim, dtype, torch.device("cpu"))
    projections = torch.randn(3, kv_heads, head_dim, dim, generator=generator)
    writer = kernels.bind_key_writer(projections, cache.keys)
    assert writer is not None and writer.matches(projections, cache.keys)
    k = torch.randn(kv_heads, head_dim + 2, generator=generator)[:, 2:]  # rows apart by more than their length
    before = cache.keys.clone()
    assert writer(1, 33, k)
    expected = torch.matmul(k.unsqueeze(1), projections[1]).squeeze(1).to(dtype)  # [KvH, d']
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 0.0}
    torch.testing.assert_close(cache.keys[1, :, :, 33].float(), expected.float(), **tolerance)
    untouched = torch.ones_like(cache.keys, dtype=torch.bool)
    untouched[1, :, :, 33] = False
    assert torch.equal(cache.keys[untouched], before[untouched])
    assert torch.equal(cache._storage[..., 40:], torch.zeros_like(cache._storage[..., 40:]))  # the padding too
    strided = torch.randn(kv_heads, 2 * head_dim, generator=generator)[:, ::2]  # the head dim not contiguous
    for other in (k.double(), torch.cat([k, k]), k[:, :-1], strided):
        assert not writer(1, 34, other)
    assert torch.equal(cache.keys[:, :, :, 34], before[:, :, :, 34])
    # the kernel itself refuses a cache code it does not know, before writing (one entry for every cache dtype)
    out, strides = cache.keys[1, :, :, 34:].data_ptr(), (cache.keys.stride(1), cache.keys.stride(2))
    for code in (-1, 3):
        assert kernels.library.tbrun_project_token(k.data_ptr(), kv_heads, head_dim, k.stride(0),
                                                   projections[1].data_ptr(), dim, out, code, *strides, 0, 0) == -1
    assert torch.equal(cache.keys[:, :, :, 34], before[:, :, :, 34])
    with pytest.raises(IndexError, match="holds 3 layers of 40 positions"):
        writer(3, 0, k)
    with pytest.raises(IndexError, match="holds 3 layers of 40 positions"):
        writer(0, 40, k)
    assert not writer.matches(projections.clone(), cache.keys)
    assert kernels.bind_key_writer(projections.double(), cache.keys) is None
    assert kernels.bind_key_writer(projections, cache.keys.to(torch.float16)) is None
    assert kernels.bind_key_writer(projections[:, :, :, :-1], cache.keys) is None  # d' of another size


@needs_compiler
@pytest.mark.parametrize("kv_heads, head_dim, dim", [(3, 64, 16), (2, 7, 5)])
def test_the_key_writer_quantises_each_heads_key_into_an_int8_cache_as_torch_does(kv_heads, head_dim, dim,
                                                                                   built_native):
    """An int8 cache (``ProjectedKeyCache`` of dtype int8): each head's projected key quantised by ``quantize_keys``'
    rule, its codes into the column and its float16 scale beside it (codes within one of torch's: the sums'
    order differs, and a code at a rounding boundary may fall the other way), nothing else written; int8 keys
    without their scales, scales of another type or shape, or float keys with scales are not bound."""
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(kv_heads * head_dim + dim)
    cache = ProjectedKeyCache(3, kv_heads, 40, dim, torch.int8, torch.device("cpu"))
    projections = torch.randn(3, kv_heads, head_dim, dim, generator=generator)
    writer = kernels.bind_key_writer(projections, cache.keys, cache.scales)
    assert writer is not None and writer.matches(projections, cache.keys, cache.scales)
    before_codes, before_scales = cache.keys.clone(), cache.scales.clone()
    for position in (0, 17, 39):
        k = torch.randn(kv_heads, head_dim, generator=generator)
        assert writer(2, position, k)
        codes, scale = quantize_keys(torch.matmul(k.unsqueeze(1), projections[2]).squeeze(1))  # [KvH, d'], [KvH]
        assert (cache.keys[2, :, :, position].int() - codes.int()).abs().max() <= 1
        torch.testing.assert_close(cache.scales[2, :, position].float(), scale.float(), rtol=1e-3, atol=0.0)
    written = torch.zeros_like(cache.keys, dtype=torch.bool)
    written[2, :, :, [0, 17, 39]] = True
    assert torch.equal(cache.keys[~written], before_codes[~written])
    kept = torch.ones(40, dtype=torch.bool)
    kept[[0, 17, 39]] = False
    assert torch.equal(cache.scales[2][:, kept], before_scales[2][:, kept])
    assert torch.equal(cache.scales[:2], before_scales[:2])
    assert not writer(2, 5, k.double())
    with pytest.raises(IndexError, match="holds 3 layers of 40 positions"):
        writer(0, 40, k)
    assert kernels.bind_key_writer(projections, cache.keys) is None
    assert kernels.bind_key_writer(projections, cache.keys, cache.scales.float()) is None
    assert kernels.bind_key_writer(projections, cache.keys, cache.scales[..., :-1]) is None
    floats = ProjectedKeyCache(3, kv_heads, 40, dim, torch.float32, torch.device("cpu"))
    assert kernels.bind_key_writer(projections, floats.keys, cache.scales) is None
    _assert_int8_writes_are_quantize_keys(kernels)


def _assert_int8_writes_are_quantize_keys(kernels) -> None:
    """Through an identity projection (exact sums), the writer's codes and float16 scales are bit for bit those of
    ``quantize_keys``, for keys whose scales are float16 subnormals, normal numbers, and past float16's range
    (infinity), and for a zero key (the 1e-8 floor)."""
    kv_heads, dim = 7, 16
    cache = ProjectedKeyCache(1, kv_heads, 8, dim, torch.int8, torch.device("cpu"))
    projections = torch.eye(dim).expand(1, kv_heads, dim, dim).contiguous()
    writer = kernels.bind_key_writer(projections, cache.keys, cache.scales)
    generator = torch.Generator().manual_seed(11)
    magnitudes = torch.tensor([1e-6, 3e-3, 0.5, 40.0, 2e7, 0.0, 1.0]).unsqueeze(1)  # scales ~1e-8 .. 3e5, zero
    k = torch.randn(kv_heads, dim, generator=generator) * magnitudes
    # a scale of exactly 1 and codes halfway between integers: ties go to the even code (0, 2, 2, -2), as torch's
    k[6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 0.0] * 2)
    assert writer(0, 3, k)
    codes, scale = quantize_keys(k)
    assert torch.equal(cache.keys[0, :, :, 3], codes)
    assert torch.equal(cache.scales[0, :, 3].view(torch.int16), scale.view(torch.int16))
    assert torch.isinf(scale[4]) and 0 < scale[1] < 6.1e-5  # the cases meant: past the range, a subnormal
    assert cache.keys[0, 6, :8, 3].tolist() == [127, 0, 2, 2, -2, 0, 4, 0]
    broken = k.clone()
    broken[2, 5] = float("nan")
    assert not writer(0, 4, broken)  # a NaN: left to torch's quantisation, as the prefill's keys


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                         scaling: float) -> torch.Tensor:
    """Decode attention in float64 over the valid tokens only: q [H, D], k, v [KvH, N, D] -> [H, D]."""
    heads, kv_heads = q.shape[0], k.shape[0]
    grouped = q.double().view(kv_heads, heads // kv_heads, -1)
    logits = torch.einsum("kgd,knd->kgn", grouped, k.double().nan_to_num()) * scaling
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.einsum("kgn,knd->kgd", weights, v.double().nan_to_num()).reshape(heads, -1)


@needs_compiler
@pytest.mark.parametrize("heads, kv_heads, dim, tokens", [
    (9, 3, 64, 3400),    # SmolLM2 (compiled for g = 3, d = 64; 212 blocks of 16 tokens and a tail of 8)
    (9, 3, 64, 5000),    # past ATTENTION_THREADED_KEYS (1,024 keys a head): KV heads split among threads
    (9, 3, 64, 1100),    # just past it, as a sparse layer at 32k (2,048 keys a head)
    (32, 8, 128, 300),   # Llama-3.1-8B (g = 4, d = 128)
    (14, 2, 64, 77),     # Qwen2.5-0.5B (g = 7)
    (8, 8, 64, 16),      # no grouping, one block exactly
    (12, 1, 32, 40),     # g = 12, d = 32: no compiled instance, the generic path
    (4, 4, 16, 5),       # the tiny test models' head dimension, a tail only
])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_native_decode_attention_is_torchs(heads, kv_heads, dim, tokens, masked, threads, built_native,
                                               monkeypatch):
    """One query token over KV heads read through a working set's strides (a layer of a bank, tokens past
    the filled prefix left out) gives float64 attention's output to float32 rounding, and matches the CPU's
    torch path (``grouped_decode_attention``), masked or not, at any thread count."""
    from offload_engine.attention import grouped_decode_attention

    monkeypatch.setenv(native.THREADS_VARIABLE, threads)
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(heads * tokens + dim)
    bank_k = torch.randn(2, kv_heads, tokens + 9, dim, generator=generator)
    bank_v = torch.randn(2, kv_heads, tokens + 9, dim, generator=generator)
    k, v = bank_k[1, :, :tokens], bank_v[1, :, :tokens]
    q = torch.randn(heads, dim, generator=generator) * 2
    valid = None
    if masked:
        valid = torch.rand(kv_heads, tokens + 9, generator=generator)[:, :tokens] > 0.4
        valid[:, 0] = True  # every head attends somewhere
    got = kernels.decode_attention(q, k, v, valid, dim ** -0.5)
    assert got is not None and got.shape == (heads, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference_attention(q, k, v, valid, dim ** -0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, grouped_decode_attention(q, k, v, valid, dim ** -0.5), rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("heads, kv_heads, dim, tokens", [(9, 3, 64, 100), (12, 1, 32, 40)])
def test_the_native_decode_attention_ignores_what_the_mask_leaves_out(heads, kv_heads, dim, tokens, built_native):
    """Keys and values of tokens the mask leaves out (a working set's unfilled or trash slots) may hold
    anything, NaN included: the output is that of the valid tokens alone. Like torch's softmax, a head with no
    valid token, or a NaN among its valid logits, gives NaN."""
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(tokens)
    k, v = (torch.randn(kv_heads, tokens, dim, generator=generator) for _ in range(2))
    q = torch.randn(heads, dim, generator=generator)
    valid = torch.rand(kv_heads, tokens, generator=generator) > 0.5
    valid[:, 3] = True
    k[~valid], v[~valid] = float("nan"), float("nan")
    got = kernels.decode_attention(q, k, v, valid, 0.125)
    torch.testing.assert_close(got.double(), _reference_attention(q, k, v, valid, 0.125), rtol=1e-5, atol=1e-6)
    valid[0] = False  # KV head 0 attends nothing
    k[-1, 3, 0] = float("nan")  # a valid key of the last KV head is NaN
    got = kernels.decode_attention(q, k, v, valid, 0.125)
    group = heads // kv_heads
    assert got[:group].isnan().all() and got[-group:].isnan().all()
    assert not got[group:-group].isnan().any()


def test_the_native_decode_attention_declines_what_it_does_not_compute(built_native):
    """Another dtype, a head dimension not a multiple of 16 or above 256, more than 16 query heads per KV head,
    no tokens, keys without a contiguous head dimension, a mask of another shape, or a gradient wanted: None,
    and ``attention.decode_attention`` runs torch's grouped matmuls."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    q, k, v = torch.randn(6, 32), torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    assert kernels.decode_attention(q, k, v, None, 0.1) is not None
    declined = {
        "bfloat16": (q.bfloat16(), k.bfloat16(), v.bfloat16(), None),
        "head dim 24": (torch.randn(6, 24), torch.randn(2, 10, 24), torch.randn(2, 10, 24), None),
        "head dim 272": (torch.randn(2, 272), torch.randn(2, 10, 272), torch.randn(2, 10, 272), None),
        "group of 17": (torch.randn(17, 32), k[:1], v[:1], None),
        "heads not a multiple": (torch.randn(5, 32), k, v, None),
        "no tokens": (q, k[:, :0], v[:, :0], None),
        "no KV heads": (q, k[:0], v[:0], torch.ones(0, 10, dtype=torch.bool)),
        "strided head dim": (q, torch.randn(2, 32, 10).transpose(1, 2), v, None),
        "mask shape": (q, k, v, torch.ones(2, 9, dtype=torch.bool)),
        "mask dtype": (q, k, v, torch.ones(2, 10)),
        "gradient": (q.clone().requires_grad_(), k, v, None),
    }
    for name, (qs, ks, vs, valid) in declined.items():
        assert kernels.decode_attention(qs, ks, vs, valid, 0.1) is None, name
    with torch.no_grad():
        assert kernels.decode_attention(q.clone().requires_grad_(), k, v, None, 0.1) is not None


@needs_compiler
@pytest.mark.parametrize("mode", ["dense-device", "sparse-offload"])
def test_a_decode_step_attends_by_the_native_kernel_and_keeps_the_logits(mode, built_native, monkeypatch):
    """Every layer of every decode step attends through the native kernel (dense over the cache, or a sparse
    policy over its working set, masked), and the logits are those of torch's grouped matmuls to float
    rounding."""
    from offload_engine import Budget, Engine, EngineConfig, KVMode, SelectionConfig
    from offload_engine.models import ModelAdapter

    from recording import record_results
    from tiny_models import tiny_model

    calls = record_results(monkeypatch, native.SelectionKernels, "decode_attention")
    model = tiny_model("llama", initializer_range=0.2)
    prompt = torch.randint(1, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    selection = SelectionConfig(policy="quest", budget=Budget.parse("16"), sinks=2, window=4)

    def run():
        config = EngineConfig(context=64, mode=KVMode(mode), selection=selection)
        return Engine(ModelAdapter(model), config).score_continuation(prompt[:30], prompt[30:], keep_logits=True).logits

    native_logits = run()
    assert all(calls) and len(calls) == 9 * model.config.num_hidden_layers  # 10 targets: 9 decode steps
    # the same run with only the attention kernel declining (TBRUN_NATIVE=0 would change the selection's
    # kernels too, whose near-ties may pick other tokens)
    monkeypatch.setattr(native.SelectionKernels, "decode_attention", lambda self, *args: None)
    torch_logits = run()
    torch.testing.assert_close(native_logits, torch_logits, rtol=1e-4, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("kv_heads, heads, dim, width", [(3, 9, 64, 576), (2, 14, 64, 896), (1, 3, 5, 7)])
def test_value_norms_of_one_token_are_the_torch_forms(kv_heads, heads, dim, width, built_native):
    """critical(...)'s value norm of a decode token (the mean over each KV group of ||v W_O^h||_1) by the native
    kernel equals policies.critical.value_norms on a strided view of an output projection's weight (SmolLM2's
    and Qwen2.5's shapes, and an odd head dim with a scalar tail); what it does not take is left to torch."""
    from offload_engine.policies.critical import value_norms

    generator = torch.Generator().manual_seed(heads + dim)
    weight = torch.randn(width, heads * dim, generator=generator)  # nn.Linear's [E, H * D]
    w_o = weight.view(width, heads, dim).permute(1, 2, 0)  # [H, D, E], D contiguous
    v = torch.randn(kv_heads, dim, generator=generator)

    def one_token(v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor | None:
        out = torch.zeros(v.shape[0], 1, dtype=v.dtype)
        writer = native.kernels().bind_value_norms(w_o, out)
        return None if writer is None or not writer(v, 0) else out[:, 0]

    fused = one_token(v, w_o)
    assert fused is not None and fused.shape == (kv_heads,)
    torch.testing.assert_close(fused, value_norms(v.unsqueeze(1), w_o)[:, 0], rtol=2e-5, atol=1e-5)
    assert one_token(v.double(), w_o.double()) is None
    per_head = w_o.transpose(1, 2).contiguous().transpose(1, 2)  # [H, D, E] at other strides, D still contiguous
    torch.testing.assert_close(one_token(v, per_head), fused, rtol=2e-5, atol=1e-5)
    if dim > 1:
        assert one_token(v[:, ::2], w_o[:, ::2]) is None  # D not contiguous
    # bound to a layer's row of norms [KvH, capacity]: each token's written at its position, nothing else touched
    norms = torch.zeros(2, kv_heads, 50)
    writer = native.kernels().bind_value_norms(w_o, norms[1])
    assert writer(v, 17) and not writer(v, 50) and not writer(v.double(), 3) and not writer(torch.cat([v, v]), 3)
    expected = torch.zeros_like(norms)
    expected[1, :, 17] = fused
    assert torch.equal(norms, expected)
    assert native.kernels().bind_value_norms(w_o, norms[1].bfloat16()) is None  # torch's form writes those


def test_the_adapter_takes_the_native_forms_only_for_the_math_they_compute():
    """The adapter's one-token kernels replace a module only where it computes their math: each supported
    family's RMSNorm class (Llama form, Gemma 3's 1 + weight), SiLU and tanh-GELU, and the rotate-half RoPE
    of every family; a norm with another forward, exact GELU, ReLU or an interleaved RoPE run as themselves."""
    import importlib

    from transformers.activations import GELUTanh, SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from offload_engine.models import _activation_name, _is_rotate_half_rope, _rms_norm_form

    for family, norm_class, offset in [("llama", "LlamaRMSNorm", 0.0), ("qwen2", "Qwen2RMSNorm", 0.0),
                                       ("qwen3", "Qwen3RMSNorm", 0.0), ("mistral", "MistralRMSNorm", 0.0),
                                       ("gemma3", "Gemma3RMSNorm", 1.0)]:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        assert _rms_norm_form(getattr(module, norm_class)(8, eps=1e-5)) == (offset, 1e-5), family
        assert _is_rotate_half_rope(module.apply_rotary_pos_emb), family

    class Doubled(LlamaRMSNorm):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    assert _rms_norm_form(Doubled(8)) is None
    assert _rms_norm_form(torch.nn.LayerNorm(8)) is None
    assert _activation_name(SiLUActivation()) == "silu" and _activation_name(torch.nn.SiLU()) == "silu"
    assert _activation_name(GELUTanh()) == "gelu_tanh"
    assert _activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert _activation_name(torch.nn.GELU()) is None and _activation_name(torch.nn.ReLU()) is None  # exact GELU

    def interleaved(q, k, cos, sin):  # GPT-J's pairs (x0, x1) -> (-x1, x0): not rotate-half
        def turn(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        return q * cos.unsqueeze(1) + turn(q) * sin.unsqueeze(1), k * cos.unsqueeze(1) + turn(k) * sin.unsqueeze(1)

    assert not _is_rotate_half_rope(interleaved)
    assert not _is_rotate_half_rope(lambda q, k: (q, k))  # another signature


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hosted", [False, True])
def test_token_rows_write_a_tokens_k_and_v_to_its_slot_and_host_position_only(dtype, hosted, built_native):
    """``TokenRows``: k, v ``[KvH, D]`` land in the bound slot rows (a bank's strided view) and, bound with the host
    store, in its token-major row at the position; every other entry keeps its value; what it cannot write
    (another dtype, strided D) is left to the caller (False); a slot or position out of range raises."""
    kernels = native.kernels()
    assert kernels is not None, native.status()
    generator = torch.Generator().manual_seed(3)
    bank_k = torch.randn(2, 3, 10, 8, generator=generator).to(dtype)  # [layers, KvH, slots, D]
    bank_v = torch.randn(2, 3, 10, 8, generator=generator).to(dtype)
    host_k = torch.randn(20, 3, 8, generator=generator).to(dtype) if hosted else None
    host_v = torch.randn(20, 3, 8, generator=generator).to(dtype) if hosted else None
    before = [t.clone() for t in (bank_k, bank_v, host_k, host_v) if t is not None]
    rows = kernels.bind_token_rows(bank_k[1], bank_v[1], host_k, host_v)
    assert rows is not None
    k = torch.randn(1, 3, 1, 8, generator=generator).to(dtype)[0, :, 0]  # a view, as the engine hands them
    v = torch.randn(1, 1, 3, 8, generator=generator).to(dtype).transpose(1, 2)[0, :, 0]
    assert rows(k, v, 7, 13)
    expected = [t.clone() for t in before]
    expected[0][1, :, 7], expected[1][1, :, 7] = k, v
    if hosted:
        expected[2][13], expected[3][13] = k, v
    for got, want in zip([t for t in (bank_k, bank_v, host_k, host_v) if t is not None], expected):
        assert torch.equal(got, want)
    assert not rows(k.float() if dtype == torch.bfloat16 else k.double(), v, 7, 13)
    assert not rows(torch.randn(3, 16).to(dtype)[:, ::2], v, 7, 13)  # D strided
    with pytest.raises(IndexError):
        rows(k, v, 10, 13)
    if hosted:
        with pytest.raises(IndexError):
            rows(k, v, 7, 20)
    assert kernels.bind_token_rows(bank_k[1], bank_v[1].float() if dtype == torch.bfloat16 else bank_v[1].double()) is None
    if hosted:
        assert kernels.bind_token_rows(bank_k[1], bank_v[1], host_k) is None  # the host's keys without its values


@needs_compiler
@pytest.mark.parametrize("mode", ["dense-device", "sparse-offload"])
def test_the_backends_write_decode_tokens_by_one_native_call(mode, built_native, monkeypatch):
    """On the CPU the dense cache and the sparse backend (working set and host store) take a decode token's K and V
    in one ``TokenRows`` call a layer, and the logits are bit for bit those of torch's writes (the kernels' other
    paths kept: the writes alone differ)."""
    from offload_engine import Budget, Engine, EngineConfig, KVMode, SelectionConfig
    from offload_engine.models import ModelAdapter

    from tiny_models import tiny_model

    written = []
    original = native.TokenRows.__call__

    def counted(self, *args):
        done = original(self, *args)
        written.append(done)
        return done

    monkeypatch.setattr(native.TokenRows, "__call__", counted)
    model = tiny_model("llama", initializer_range=0.2)
    prompt = torch.randint(1, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    kv_mode = KVMode.DENSE_DEVICE if mode == "dense-device" else KVMode.SPARSE_OFFLOAD
    selection = SelectionConfig(policy="quest", budget=Budget.parse("8"), sinks=2, window=4)

    def run():
        engine = Engine(ModelAdapter(model), EngineConfig(context=40, mode=kv_mode, selection=selection))
        return engine.score_continuation(prompt[:16], prompt[16:], keep_logits=True).logits

    native_logits = run()
    assert written == [True] * (len(prompt) - 16 - 1) * model.config.num_hidden_layers
    monkeypatch.setattr(native.SelectionKernels, "bind_token_rows", lambda self, *args: None)
    written.clear()
    torch_logits = run()
    assert written == []
    assert torch.equal(native_logits, torch_logits)


@needs_compiler
@pytest.mark.parametrize("arch, options", [("llama", {}), ("llama", {"attention_bias": True}), ("qwen2", {}),
                                           ("qwen3", {}), ("mistral_sw", {})])
def test_a_bound_decode_layer_computes_the_adapters_pieces(arch, options, built_native):
    """``DecodeLayer``'s two calls give what the adapter's pieces give for one token (``attention_input`` +
    ``qkv`` at a position; ``finish_layer``), with Llama's attention biases (o's too), Qwen2's q/k/v biases,
    Qwen3's per-head norms; a weight replaced since binding (a new tensor) is bound again and its values read."""
    from offload_engine.models import ModelAdapter

    from tiny_models import tiny_model

    model = tiny_model(arch, initializer_range=0.2, **options)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 1, model.config.hidden_size, generator=generator)
    attention = torch.randn(1, adapter.dims.num_heads, 1, adapter.dims.head_dim, generator=generator)
    rope = adapter.rope(hidden, torch.tensor([[37]]))

    def pieces(layer):
        x = adapter.attention_input(layer, hidden)
        return (x, *adapter.qkv(layer, x, rope)), adapter.finish_layer(layer, hidden, attention)

    with torch.no_grad():
        for layer in range(adapter.dims.num_layers):
            bound = adapter._decode_layer(layer)
            assert bound is not None
            fused = bound.input(hidden, rope[0][0, 0], rope[1][0, 0]), bound.output(hidden, attention)
            adapter._bound_layers[layer] = None  # the adapter's pieces from here
            expected = pieces(layer)
            for got, want in zip((*fused[0], fused[1]), (*expected[0], expected[1])):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            del adapter._bound_layers[layer]
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.weight.data = 2 * q_proj.weight.data  # a new tensor: the bound address is stale
        _, q, _, _ = adapter.decode_input(0, hidden, rope)
        adapter._bound_layers[0] = None
        _, q_pieces, _, _ = adapter.decode_input(0, hidden, rope)
        torch.testing.assert_close(q, q_pieces, rtol=1e-5, atol=1e-5)
    del adapter._bound_layers[0]
    with torch.enable_grad():  # a gradient recorded: the pieces, which record it
        _, q, _, _ = adapter.decode_input(0, hidden, rope)
        assert q.requires_grad and 0 not in adapter._bound_layers


def test_a_decode_layer_binds_only_what_its_kernels_compute(built_native):
    """Gemma 3's sandwich norms, a bfloat16 model, a weight of another shape: no bound layer (the pieces run)."""
    import dataclasses

    from offload_engine.models import ModelAdapter

    from tiny_models import tiny_model

    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    assert ModelAdapter(tiny_model("gemma3"))._decode_layer(0) is None
    assert ModelAdapter(tiny_model("llama").to(torch.bfloat16))._decode_layer(0) is None
    parts = ModelAdapter(tiny_model("llama"))._layer_parts(0)
    assert kernels.bind_decode_layer(parts) is not None
    assert kernels.bind_decode_layer(dataclasses.replace(parts, wo=parts.wo[:, :-1].contiguous())) is None
    assert kernels.bind_decode_layer(dataclasses.replace(parts, gate=parts.gate.t())) is None  # not contiguous
    assert kernels.bind_decode_layer(dataclasses.replace(parts, activation="relu")) is None
