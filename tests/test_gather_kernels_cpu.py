"""The CUDA gather kernels, checked on a machine without a GPU.

- The Triton kernel runs under Triton's interpreter on CPU tensors against plain indexing: odd
  counts, padding, empty selections, the last position of the capacity, bf16/fp16/fp32, strided
  destinations, a token-major source (the host store's layout).
- The Triton kernel compiles for sm_90 to PTX here: addresses and offsets are 64-bit, loads and
  stores are 16-byte vectors.
- The cupy kernel's CUDA C source compiles as C++ with the CUDA built-ins stubbed, and runs over
  its whole grid on the CPU against plain indexing.
- batched-copy's host half (which rows to read, where each goes) against plain indexing.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import warnings

import pytest
import torch

from offload_engine.cpu_cache import gather
from offload_engine.cpu_cache.gather import check_vector_alignment, pick_on_host, token_rows

triton = pytest.importorskip("triton", reason="Triton is in the dev extra: pip install -e '.[dev]'")
from offload_engine.cpu_cache import gather_triton  # noqa: E402  (needs triton)


def plan(heads: int, capacity: int, counts: list[int], width: int, slots: int, seed: int):
    """positions, slots ``[KvH, width]`` and counts ``[KvH]`` like a residency plan: ``counts[h]``
    distinct positions (the last of the capacity among them) into distinct slots, then padding
    pairs (position 0, trash slot ``slots - 1``)."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.zeros(heads, width, dtype=torch.long)
    targets = torch.full((heads, width), slots - 1, dtype=torch.long)
    for h, n in enumerate(counts):
        tokens = torch.cat([torch.tensor([capacity - 1]), torch.randperm(capacity - 1, generator=g)])[:n]
        positions[h, :n] = tokens[torch.randperm(n, generator=g)]
        targets[h, :n] = torch.randperm(slots - 1, generator=g)[:n]
    return positions, targets, torch.tensor(counts, dtype=torch.long)


def expected_after(src, positions, slots, counts, dst) -> torch.Tensor:
    """dst after copying the real entries one by one (padding moves nothing)."""
    out = dst.clone()
    for h in range(positions.shape[0]):
        for j in range(int(counts[h])):
            out[h, slots[h, j]] = src[h, positions[h, j]]
    return out


def token_major(heads: int, capacity: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A ``[KvH, C, D]`` view of ``[C, KvH, D]`` storage, as the host store hands out."""
    values = torch.randn(capacity, heads, dim, generator=torch.Generator().manual_seed(seed))
    return values.to(dtype).transpose(0, 1)


@pytest.fixture(scope="module")
def interpreted():
    return gather_triton.interpreted_kernel()


CASES = [  # (heads, capacity, dim, counts, width)
    (3, 97, 24, [5, 0, 7], 7),  # odd counts, an empty head, padding
    (2, 50, 64, [1, 1], 4),  # one real entry each, mostly padding
    (4, 33, 8, [33, 17, 2, 9], 33),  # a head taking the whole capacity
    (1, 9, 16, [0], 3),  # an empty selection, padding only
]


@pytest.mark.parametrize("heads,capacity,dim,counts,width", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interpreted_triton_kernel_matches_indexing(interpreted, heads, capacity, dim, counts, width, dtype):
    src = token_major(heads, capacity, dim, dtype, seed=capacity)
    slot_count = width + 3
    positions, slots, real = plan(heads, capacity, counts, width, slot_count, seed=dim)
    dst = torch.full((heads, slot_count, dim), -7.0).to(dtype)
    expected = expected_after(src, positions, slots, real, dst)
    gather_triton.launch(src, positions, slots, real, dst, kernel=interpreted)
    assert torch.equal(dst, expected)  # the trash slot too: padding entries move no bytes


def test_interpreted_triton_kernel_without_counts_copies_every_entry(interpreted):
    src = token_major(2, 40, 16, torch.bfloat16)
    positions, slots, _ = plan(2, 40, [6, 6], 6, 8, seed=1)
    dst = torch.zeros(2, 8, 16, dtype=torch.bfloat16)
    gather_triton.launch(src, positions, slots, None, dst, kernel=interpreted)
    assert torch.equal(dst, expected_after(src, positions, slots, torch.tensor([6, 6]), torch.zeros_like(dst)))


def test_interpreted_triton_kernel_writes_a_strided_destination_only_in_its_slots(interpreted):
    """dst is the selected region of a working-set buffer: a view with a head stride of 50 rows."""
    src = token_major(3, 61, 32, torch.float16, seed=2)
    buffer = torch.zeros(3, 50, 32, dtype=torch.float16)
    dst = buffer[:, 20:45]  # [3, 25, 32], not contiguous
    positions, slots, real = plan(3, 61, [24, 3, 11], 24, 25, seed=3)
    expected = expected_after(src, positions, slots, real, dst)
    gather_triton.launch(src, positions.contiguous(), slots.contiguous(), real, dst, kernel=interpreted)
    assert torch.equal(dst, expected)
    assert buffer[:, :20].abs().sum() == 0 and buffer[:, 45:].abs().sum() == 0


def test_one_program_covers_many_fragments_and_rows_are_whole_words():
    constants, grid = gather_triton.launch_shape(row_words=64, m=2049, heads=8)  # bf16 x 128
    assert constants == {"ROW_WORDS": 64, "ROW_BLOCK": 64, "FRAGS": 32} and grid == (65, 8)
    constants, _ = gather_triton.launch_shape(row_words=12, m=1, heads=1)  # fp32 x 12: masked tail
    assert constants["ROW_BLOCK"] == 16


# ------------------------------------------------------------------------------------- PTX


@pytest.fixture(scope="module")
def ptx() -> dict[bool, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton's notice about its floating-point fusion default
        return {counts: gather_triton.compile_ptx(90, row_words=64, has_counts=counts) for counts in (True, False)}


@pytest.mark.parametrize("has_counts", [True, False])
def test_ptx_for_sm90_uses_64_bit_offsets(ptx, has_counts):
    code = ptx[has_counts]
    assert ".target sm_90" in code and ".address_size 64" in code
    assert re.search(r"\bmul\.lo\.s64\b|\bmad\.lo\.s64\b", code), "offsets are not multiplied in 64 bits"
    # A truncating 32-bit multiply would wrap offsets past 2**31 words (8 GiB).
    assert not re.search(r"\b(mul|mad)\.lo\.[su]32\b", code)
    assert "ld.global.b64" in code  # positions and slots read as 64-bit integers


@pytest.mark.parametrize("has_counts", [True, False])
def test_ptx_for_sm90_moves_16_byte_vectors(ptx, has_counts):
    code = ptx[has_counts]
    loads, stores = re.findall(r"ld\.global[\w.]*", code), re.findall(r"st\.global[\w.]*", code)
    assert any(".v4.b32" in op for op in loads) and stores
    assert all(".v4.b32" in op for op in stores), f"stores that are not 16-byte vectors: {set(stores)}"
    scalar = [op for op in loads if op.endswith(".b32") and ".v" not in op]
    assert not scalar, "scalar 4-byte loads of fragment words"


def test_counts_are_read_on_the_device(ptx):
    """With counts the kernel loads one more 64-bit value (the head's count) and compares it."""
    with_counts, without = ptx[True], ptx[False]
    assert len(re.findall(r"ld\.global\.b64", with_counts)) > len(re.findall(r"ld\.global\.b64", without))


# ------------------------------------------------------------------------ cupy kernel as C++

_STUBS = r"""
#include <cstdio>
#include <cstdint>
#define __global__
#define __restrict__
struct uint4 { unsigned x, y, z, w; };
struct Dim3 { long long x, y, z; };
static Dim3 blockIdx, blockDim, threadIdx, gridDim;
"""

_MAIN = r"""
// Runs every (block, thread) of the launch in turn. Input on stdin: m vecs heads C S blocks threads
// counts_given, counts[heads], positions[heads*m], slots[heads*m]; src words follow implicitly.
int main() {
    long long m, vecs, heads, cap, slots_n, blocks, threads, given;
    if (scanf("%lld %lld %lld %lld %lld %lld %lld %lld", &m, &vecs, &heads, &cap, &slots_n, &blocks, &threads,
              &given) != 8) return 2;
    long long* counts = new long long[heads];
    long long* pos = new long long[heads * m];
    long long* slot = new long long[heads * m];
    for (long long i = 0; i < heads; ++i) if (scanf("%lld", &counts[i]) != 1) return 2;
    for (long long i = 0; i < heads * m; ++i) if (scanf("%lld", &pos[i]) != 1) return 2;
    for (long long i = 0; i < heads * m; ++i) if (scanf("%lld", &slot[i]) != 1) return 2;
    // src word w of (h, p, v) = h * 1000000 + p * 1000 + v, in a token-major layout [C, KvH, vecs]
    uint4* src = new uint4[cap * heads * vecs];
    for (long long p = 0; p < cap; ++p) for (long long h = 0; h < heads; ++h) for (long long v = 0; v < vecs; ++v) {
        unsigned w = (unsigned)(h * 1000000 + p * 1000 + v);
        src[(p * heads + h) * vecs + v] = uint4{w, w + 1, w + 2, w + 3};
    }
    uint4* dst = new uint4[heads * slots_n * vecs];
    for (long long i = 0; i < heads * slots_n * vecs; ++i) dst[i] = uint4{7, 7, 7, 7};
    gridDim = Dim3{blocks, heads, 1}; blockDim = Dim3{threads, 1, 1};
    for (long long y = 0; y < heads; ++y)
    for (long long x = 0; x < blocks; ++x)
    for (long long t = 0; t < threads; ++t) {
        blockIdx = Dim3{x, y, 0}; threadIdx = Dim3{t, 0, 0};
        gather_fragments_vec16(src, pos, slot, given ? counts : nullptr, dst, m, vecs,
                               vecs, heads * vecs, slots_n * vecs, vecs, m, m);
    }
    for (long long i = 0; i < heads * slots_n * vecs; ++i) printf("%u\n", dst[i].x);
    return 0;
}
"""


def _cupy_source() -> str:
    text = (gather.Path(gather.__file__).parent / "gather_cupy.py").read_text()
    return ast.literal_eval(re.search(r'_SOURCE = (r""".*?""")', text, re.S).group(1))


@pytest.fixture(scope="module")
def cupy_kernel_binary(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the cupy kernel's source on the CPU")
    folder = tmp_path_factory.mktemp("cupy-kernel")
    (folder / "kernel.cpp").write_text(_STUBS + _cupy_source() + _MAIN)
    subprocess.run([compiler, "-O1", "-Wall", "-Werror", "-o", str(folder / "kernel"), str(folder / "kernel.cpp")],
                   check=True, capture_output=True, text=True)
    return folder / "kernel"


@pytest.mark.parametrize("counts_given", [True, False])
def test_cupy_kernel_source_runs_its_grid_like_indexing(cupy_kernel_binary, counts_given):
    heads, capacity, vecs, width, slot_count = 3, 23, 4, 9, 12
    positions, slots, counts = plan(heads, capacity, [9, 4, 0], width, slot_count, seed=5)
    blocks, threads = 2, 8  # fewer threads than vectors: the grid-stride loop must cover the rest
    numbers = [width, vecs, heads, capacity, slot_count, blocks, threads, int(counts_given), *counts.tolist(),
               *positions.flatten().tolist(), *slots.flatten().tolist()]
    run = subprocess.run([str(cupy_kernel_binary)], input=" ".join(map(str, numbers)), capture_output=True,
                         text=True, check=True)
    got = torch.tensor([int(w) for w in run.stdout.split()]).view(heads, slot_count, vecs)
    words = (torch.arange(heads).view(heads, 1, 1) * 1000000 + torch.arange(capacity).view(1, capacity, 1) * 1000
             + torch.arange(vecs).view(1, 1, vecs))  # first word of each vector, [KvH, C, vecs]
    real = counts if counts_given else torch.full((heads,), width)
    expected = expected_after(words, positions, slots, real, torch.full((heads, slot_count, vecs), 7))
    if counts_given:
        assert torch.equal(got, expected)
    else:  # padding copies position 0 into the trash slot: compare the real slots only
        assert torch.equal(got[:, :-1], expected[:, :-1])
        padded = counts < width  # heads with padding entries: position 0 lands in their trash slot
        assert torch.equal(got[padded, -1], words[padded, 0])


# ------------------------------------------------------------------- batched-copy, host half


@pytest.mark.parametrize("layout", ["token-major", "head-major"])
def test_batched_copy_host_half_picks_the_real_rows(layout):
    heads, capacity, dim = 3, 41, 8
    src = token_major(heads, capacity, dim, torch.float32) if layout == "token-major" else \
        torch.randn(heads, capacity, dim)
    positions, slots, counts = plan(heads, capacity, [4, 0, 6], 6, 8, seed=9)
    rows, flat = pick_on_host(src, positions, counts)
    assert flat.numel() == 10  # only the real entries: what crosses the bus
    dst = torch.full((heads, 8, dim), -1.0)
    storage_rows = token_rows(src)[0]
    dst[flat // 6, slots.flatten()[flat]] = storage_rows[rows]
    assert torch.equal(dst, expected_after(src, positions, slots, counts, torch.full_like(dst, -1.0)))


def test_vector_alignment_is_checked_on_the_token_major_view():
    check_vector_alignment(token_major(2, 10, 8, torch.bfloat16), torch.zeros(2, 4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="16-byte vectors"):  # rows of 12 bytes
        check_vector_alignment(token_major(2, 10, 6, torch.float16), torch.zeros(2, 4, 6, dtype=torch.float16))
