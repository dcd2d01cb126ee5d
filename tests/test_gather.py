"""The gather methods agree with a plain loop over fragments.

CPU: the ``index`` method (the only one on a machine without CUDA); the CUDA kernels themselves
are checked on CPU in test_gather_kernels_cpu.py. GPU (``-m gpu``): every method this machine
has, with and without per-head counts, on torch-pinned and registered token-major stores, and a
store over 8 GiB, so byte and 32-bit-word offsets both pass 2**32.
"""

from __future__ import annotations

import psutil
import pytest
import torch

from offload_engine.cpu_cache.gather import (
    ALL_METHODS,
    INDEX,
    ZERO_COPY,
    ZERO_COPY_CUPY,
    as_wide_rows,
    available_gather_methods,
    default_gather_method,
    gather_fragments,
    gather_pairs,
    pairs_gatherer,
    self_check,
)

from gpu_helpers import require_gather_method

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def loop_reference(src: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst (on the host) after copying src[h, positions[h, j]] to [h, slots[h, j]], one by one."""
    out = dst.detach().cpu().clone()
    positions, slots = positions.cpu(), slots.cpu()
    for h in range(positions.shape[0]):
        for j in range(positions.shape[1]):
            out[h, slots[h, j]] = src[h, positions[h, j]]
    return out


def random_selection(heads: int, capacity: int, m: int, slots: int, padding: int, seed: int, device="cpu"):
    """positions, slots ``[KvH, m + padding]``: ``m`` distinct tokens per head (always including
    the last token of the capacity when m > 0) into distinct slots, then ``padding`` entries
    routed to the trash slot ``slots - 1``."""
    g = torch.Generator().manual_seed(seed)
    pos_rows, slot_rows = [], []
    for _ in range(heads):
        tokens = torch.randperm(capacity - 1, generator=g)[: max(m - 1, 0)]
        tokens = torch.cat([tokens, torch.tensor([capacity - 1])])[:m] if m else tokens[:0]
        targets = torch.randperm(slots - 1, generator=g)[:m]
        pad_pos = torch.randint(0, capacity, (padding,), generator=g)
        pos_rows.append(torch.cat([tokens, pad_pos]))
        slot_rows.append(torch.cat([targets, torch.full((padding,), slots - 1)]))
    positions = torch.stack(pos_rows).long().to(device)
    slot_index = torch.stack(slot_rows).long().to(device)
    return positions, slot_index


def check_method(method: str, src: torch.Tensor, heads: int, m: int, padding: int, slot_count: int, device: str,
                 seed: int = 0, with_counts: bool = False):
    positions, slots = random_selection(heads, src.shape[1], m, slot_count, padding, seed, device)
    dst = torch.full((heads, slot_count, src.shape[2]), -7, dtype=src.dtype, device=device)
    if with_counts:  # padding entries are masked: the trash slot keeps its value
        counts = torch.full((heads,), m, dtype=torch.long, device=device)
        expected = loop_reference(src, positions[:, :m], slots[:, :m], dst)
        gather_fragments(src, positions, slots, dst, method, counts)
    else:
        expected = loop_reference(src, positions, slots, dst)
        gather_fragments(src, positions, slots, dst, method)
    if device != "cpu":
        torch.cuda.synchronize()
    if with_counts:
        assert torch.equal(dst.cpu(), expected)
    else:  # the trash slot (last) holds one of several writes, unspecified which: compare the rest
        assert torch.equal(dst[:, :-1].cpu(), expected[:, :-1])


# ----------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("m,padding", [(1, 0), (7, 3), (33, 0), (0, 0), (0, 5), (64, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("dim", [24, 6])  # rows of a multiple of 16 bytes (moved as 16-byte elements), and not
def test_index_matches_loop(m, padding, dtype, with_counts, dim):
    src = torch.randn(97, 3, dim).to(dtype).transpose(0, 1)  # token-major; odd capacity, odd head count
    check_method(INDEX, src, heads=3, m=m, padding=padding, slot_count=m + 2, device="cpu", seed=m,
                 with_counts=with_counts)


def test_index_gathers_from_a_store_at_an_odd_offset():
    """A store whose rows start off a 16-byte boundary cannot be viewed wide: the plain rows move."""
    src = torch.randn(97 * 3 * 8 + 1)[1:].view(97, 3, 8).transpose(0, 1)
    assert as_wide_rows(src) is src
    check_method(INDEX, src, heads=3, m=20, padding=2, slot_count=23, device="cpu", seed=1)


@pytest.mark.parametrize("with_counts", [False, True])
def test_index_writes_a_bank_slice_and_nothing_around_it(with_counts):
    """The working set hands the gather a slice of a bank's rows ``[KvH, slots, D]`` inside ``[KvH, T, D]``."""
    src = torch.randn(50, 3, 16).transpose(0, 1)
    bank = torch.full((3, 40, 16), -7.0)
    dst = bank[:, 5:25]
    positions, slots = random_selection(3, 50, 12, 20, 2, seed=3)
    counts = torch.full((3,), 12) if with_counts else None
    gather_fragments(src, positions, slots, dst, INDEX, counts)
    expected = loop_reference(src, positions[:, :12], slots[:, :12], torch.full((3, 20, 16), -7.0))
    assert torch.equal(dst[:, :-1], expected[:, :-1])
    assert (bank[:, :5] == -7).all() and (bank[:, 25:] == -7).all()


@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("same_layout", [True, False], ids=["shared-rows", "per-pair"])
def test_pairs_gather_each_pair_as_gather_fragments_does(with_counts, same_layout):
    """A layer's keys and values from one plan: the same result as two ``gather_fragments`` calls,
    whether the row numbers are shared (one layout) or each pair is gathered alone (two layouts)."""
    keys = torch.randn(61, 3, 16).transpose(0, 1)  # token-major store
    values = torch.randn(61, 3, 16).transpose(0, 1) if same_layout else torch.randn(3, 61, 16)  # head-major
    positions, slots = random_selection(3, 61, 9, 12, 2, seed=5)
    counts = torch.tensor([9, 4, 0]) if with_counts else None
    got = [torch.full((3, 12, 16), -7.0) for _ in range(2)]
    expected = [g.clone() for g in got]
    gather_pairs(((keys, got[0]), (values, got[1])), positions, slots, INDEX, counts)
    for src, dst in zip((keys, values), expected):
        gather_fragments(src, positions, slots, dst, INDEX, counts)
    assert all(torch.equal(g[:, :-1], e[:, :-1]) for g, e in zip(got, expected))
    if with_counts:  # padding moved nothing, the trash slot included
        assert torch.equal(got[0], expected[0]) and (got[1][2] == -7).all()


@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("same_layout", [True, False], ids=["shared-rows", "per-pair"])
def test_a_bound_gatherer_copies_what_gather_pairs_copies_plan_after_plan(with_counts, same_layout):
    """``pairs_gatherer`` (a layer's tables checked once, as the sparse backend fetches): plan after plan into
    the same tables, the same result as ``gather_pairs``; a bad plan is refused with nothing copied."""
    keys = torch.randn(61, 3, 16).transpose(0, 1)
    values = torch.randn(61, 3, 16).transpose(0, 1) if same_layout else torch.randn(3, 61, 16)
    got = [torch.full((3, 12, 16), -7.0) for _ in range(2)]
    expected = [g.clone() for g in got]
    gather = pairs_gatherer(((keys, got[0]), (values, got[1])), INDEX)
    for seed, m in ((5, 9), (6, 4), (7, 0)):
        positions, slots = random_selection(3, 61, m, 12, 2, seed=seed)
        counts = torch.tensor([m, m // 2, 0]) if with_counts else None
        gather(positions, slots, counts)
        gather_pairs(((keys, expected[0]), (values, expected[1])), positions, slots, INDEX, counts)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    before = [g.clone() for g in got]
    with pytest.raises(ValueError, match="must both be"):
        gather(_long(2, 1), _long(2, 1), None)  # two heads' plan for three
    with pytest.raises(ValueError, match="long"):
        gather(torch.zeros(3, 1), _long(3, 1), None)
    with pytest.raises((IndexError, ValueError)):
        gather(torch.full((3, 1), 61, dtype=torch.long), _long(3, 1), None)  # a position past the store
    assert all(torch.equal(g, b) for g, b in zip(got, before))


@pytest.mark.parametrize("values_layout", ["token-major", "head-major"])  # shared row numbers, or pair by pair
def test_pairs_refuse_a_mismatched_pair_before_copying(values_layout):
    keys = torch.randn(20, 3, 8).transpose(0, 1)
    values = torch.randn(20, 3, 4).transpose(0, 1) if values_layout == "token-major" else torch.randn(3, 20, 4)
    dst_k, dst_v = torch.zeros(3, 5, 8), torch.zeros(3, 5, 8)
    positions, slots = torch.tensor([[1], [2], [3]]), torch.tensor([[0], [1], [2]])
    with pytest.raises(ValueError, match="head dim"):
        gather_pairs(((keys, dst_k), (values, dst_v)), positions, slots, INDEX)
    assert dst_k.abs().sum() == 0


def test_pairs_of_one_layout_compute_row_numbers_once(monkeypatch):
    """The torch path (no native kernels): one set of row numbers for a layer's K and V."""
    from offload_engine import native
    from offload_engine.cpu_cache import gather as gather_module

    monkeypatch.setenv("TBRUN_NATIVE", "0")

    calls = []
    original = gather_module._row_numbers
    monkeypatch.setattr(gather_module, "_row_numbers", lambda *a: calls.append(1) or original(*a))
    keys, values = (torch.randn(40, 3, 16).transpose(0, 1) for _ in range(2))
    positions, slots = random_selection(3, 40, 6, 8, 0, seed=2)
    gather_pairs(((keys, torch.zeros(3, 8, 16)), (values, torch.zeros(3, 8, 16))), positions, slots, INDEX)
    assert calls == [1]


def test_wide_rows_are_the_same_bytes():
    rows = torch.randn(5, 3, 64)
    wide = as_wide_rows(rows)
    assert wide.dtype == torch.complex128 and wide.shape == (5, 3, 16) and wide.data_ptr() == rows.data_ptr()
    assert as_wide_rows(torch.randn(5, 3)).dtype == torch.float32  # 12-byte rows stay as they are


def test_index_reads_last_token_and_writes_last_real_slot():
    src = torch.arange(2 * 10 * 4, dtype=torch.float32).view(2, 10, 4)
    positions = torch.tensor([[9], [9]])
    slots = torch.tensor([[4], [0]])
    dst = torch.zeros(2, 6, 4)
    gather_fragments(src, positions, slots, dst, INDEX)
    assert torch.equal(dst[0, 4], src[0, 9]) and torch.equal(dst[1, 0], src[1, 9])
    assert dst[0, :4].abs().sum() == 0


def test_empty_selection_leaves_dst_untouched():
    src = torch.randn(2, 5, 8)
    dst = torch.ones(2, 3, 8)
    empty = torch.empty(2, 0, dtype=torch.long)
    gather_fragments(src, empty, empty, dst, INDEX)
    assert torch.equal(dst, torch.ones(2, 3, 8))


def _long(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.long)


@pytest.mark.parametrize(
    "src,positions,slots,dst,match",
    [  # wrong KV heads; positions and slots of different shapes; float positions; dtype mismatch
        (torch.zeros(2, 5, 8), _long(2, 1), _long(2, 1), torch.zeros(3, 2, 8), "match src"),
        (torch.zeros(2, 5, 8), _long(2, 1), _long(2, 2), torch.zeros(2, 2, 8), "must both be"),
        (torch.zeros(2, 5, 8), torch.zeros(2, 1), _long(2, 1), torch.zeros(2, 2, 8), "torch.long"),
        (torch.zeros(2, 5, 8), _long(2, 1), _long(2, 1), torch.zeros(2, 2, 8).half(), "dtype"),
    ],
)
def test_bad_arguments_are_refused(src, positions, slots, dst, match):
    with pytest.raises(ValueError, match=match):
        gather_fragments(src, positions, slots, dst, INDEX)


def test_unknown_method_is_refused():
    one = torch.zeros(1, 1).long()
    with pytest.raises(ValueError, match="unknown gather method"):
        gather_fragments(torch.zeros(1, 2, 4), one, one, torch.zeros(1, 2, 4), "teleport")


@pytest.mark.parametrize("method", [ZERO_COPY, ZERO_COPY_CUPY])
def test_zero_copy_refuses_a_cpu_destination(method):
    one = torch.zeros(1, 1).long()
    with pytest.raises(ValueError, match="use method 'index'"):
        gather_fragments(torch.zeros(1, 2, 8), one, one, torch.zeros(1, 2, 8), method)


def test_cpu_has_only_index_and_it_is_the_default():
    assert available_gather_methods("cpu") == [INDEX]
    assert default_gather_method("cpu") == INDEX


# ----------------------------------------------------------------------------------------------
# GPU

CUDA_METHODS = list(ALL_METHODS)


def _pinned_store(heads: int, capacity: int, dim: int, dtype: torch.dtype, via: str) -> torch.Tensor:
    """A pinned ``[KvH, C, D]`` store filled with distinct values: torch's pinned allocator
    (head-major), or the host store's registered token-major memory."""
    from offload_engine.cpu_cache.host_store import allocate_host

    if via == "registered":  # the view alone keeps the memory page-locked (allocate_host's promise)
        store = allocate_host((capacity, heads, dim), dtype, pin=True).transpose(0, 1)
    else:
        store = torch.empty((heads, capacity, dim), dtype=dtype, pin_memory=True)
    store.copy_(torch.randn(store.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return store


def _require(method: str) -> None:
    require_gather_method(method)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float32, 128),
                                       (torch.float16, 8)])
@pytest.mark.parametrize("m,padding", [(1, 0), (2047, 1), (2048, 0), (333, 17), (0, 0), (0, 3)])
@pytest.mark.parametrize("with_counts", [False, True])
def test_cuda_method_matches_loop(method, dtype, dim, m, padding, with_counts):
    _require(method)
    src = _pinned_store(heads=8, capacity=4099, dim=dim, dtype=dtype, via="torch")
    check_method(method, src, heads=8, m=m, padding=padding, slot_count=m + 5, device="cuda", seed=m + dim,
                 with_counts=with_counts)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
@pytest.mark.parametrize("with_counts", [False, True])
def test_cuda_method_reads_the_registered_token_major_store(method, with_counts):
    """The host store's memory (cudaHostRegister'ed, token-major): the kernels must read it too."""
    _require(method)
    src = _pinned_store(heads=8, capacity=4099, dim=128, dtype=torch.bfloat16, via="registered")
    check_method(method, src, heads=8, m=1000, padding=3, slot_count=1005, device="cuda", seed=7,
                 with_counts=with_counts)


@gpu
@needs_cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_cuda_method_into_a_strided_view_on_a_side_stream(method):
    """dst is a slice of a larger working-set buffer; the copy runs on a non-default stream."""
    _require(method)
    src = _pinned_store(heads=4, capacity=1000, dim=128, dtype=torch.bfloat16, via="torch")
    positions, slots = random_selection(4, 1000, 100, 130, 2, seed=3, device="cuda")
    buffer = torch.zeros(4, 200, 128, dtype=torch.bfloat16, device="cuda")
    dst = buffer[:, 50:180]  # [4, 130, 128], head stride 200 rows
    expected = loop_reference(src, positions, slots, dst)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the buffer was zeroed on the default stream
    with torch.cuda.stream(stream):
        gather_fragments(src, positions, slots, dst, method)
    stream.synchronize()
    assert torch.equal(dst[:, :-1].cpu(), expected[:, :-1])
    assert buffer[:, :50].abs().sum() == 0 and buffer[:, 180:].abs().sum() == 0


@gpu
@needs_cuda
@pytest.mark.parametrize("method", [ZERO_COPY, ZERO_COPY_CUPY])
def test_zero_copy_refuses_pageable_memory(method):
    _require(method)
    src = torch.zeros(2, 10, 64)  # not pinned: reading it from the GPU would fault
    one = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="not pinned"):
        gather_fragments(src, one, one, torch.zeros(2, 2, 64, device="cuda"), method)


@gpu
@needs_cuda
def test_cuda_default_is_a_zero_copy_kernel_that_passes_its_self_check():
    methods = available_gather_methods("cuda")
    zero_copy = [m for m in (ZERO_COPY, ZERO_COPY_CUPY) if m in methods]
    if not zero_copy:
        pytest.skip("neither Triton nor cupy is importable")
    device = f"cuda:{torch.cuda.current_device()}"
    assert [m for m in zero_copy if self_check(m, device)], "no zero-copy kernel passed its self-check"
    assert default_gather_method("cuda") in zero_copy


BIG_HEADS, BIG_DIM = 2, 128
BIG_CAPACITY = 17 * 2**20  # 2 heads x 17 Mi tokens x 256 B (bf16) = 8.5 GiB: offsets past 2**33 bytes


@pytest.fixture(scope="module")
def big_store():
    """A pinned bf16 store of 8.5 GiB with a known pattern at the rows the test reads."""
    need = BIG_HEADS * BIG_CAPACITY * BIG_DIM * 2
    if psutil.virtual_memory().available < need + 8 * 2**30:
        pytest.skip(f"needs {need / 2**30:.1f} GiB + 8 GiB spare host memory for the >4 GiB store")
    from offload_engine.cpu_cache.host_store import allocate_host

    store = allocate_host((BIG_HEADS, BIG_CAPACITY, BIG_DIM), torch.bfloat16, pin=True)  # registered, exact size
    yield store
    del store


@gpu
@needs_cuda
@pytest.mark.parametrize("method", CUDA_METHODS)
def test_cuda_method_reads_past_4_gib(method, big_store):
    _require(method)
    c = BIG_CAPACITY
    # Tokens at the start, at 2 GiB and 4 GiB into head 0, and at the end of each head: head 1's
    # end lies past 8 GiB, beyond 2**31 32-bit words.
    tokens = torch.tensor([0, 2**23 - 1, 2**23, 2**24 + 5, c - 2, c - 1])
    g = torch.Generator().manual_seed(5)
    for h in range(BIG_HEADS):
        big_store[h, tokens] = torch.randn(len(tokens), BIG_DIM, generator=g).to(torch.bfloat16)
    positions = torch.stack([tokens, tokens.flip(0)]).cuda()  # [2, 6]
    slots = torch.arange(6).repeat(2, 1).cuda()
    dst = torch.zeros(2, 7, BIG_DIM, dtype=torch.bfloat16, device="cuda")
    gather_fragments(big_store, positions, slots, dst, method)
    torch.cuda.synchronize()
    for h in range(BIG_HEADS):
        assert torch.equal(dst[h, :6].cpu(), big_store[h, positions[h].cpu()])
