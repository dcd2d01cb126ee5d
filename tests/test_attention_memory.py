"""Prefill attention never materialises per-head scores over the whole context; decode attention
with a mask gets a fused-kernel layout. Checked on CPU by watching every tensor PyTorch makes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from offload_engine import attention
from offload_engine.attention import decode_attention, prefill_attention

pytestmark = pytest.mark.usefixtures("one_thread")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (every intermediate the math path makes)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() * tensor.element_size() > self.bytes:
                self.bytes, self.op = tensor.numel() * tensor.element_size(), str(func)
        return out


HEADS, KV_HEADS, LENGTH, DIM, CHUNK = 4, 2, 4096, 16, 512


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, LENGTH, DIM, generator=g)
    k, v = torch.randn(1, KV_HEADS, LENGTH, DIM, generator=g), torch.randn(1, KV_HEADS, LENGTH, DIM, generator=g)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    return q, k, v, reference


def per_head_scores(rows: int) -> int:
    """Bytes of fp32 scores of ``rows`` queries over the whole context, all heads."""
    return HEADS * rows * LENGTH * 4


def test_long_prefill_on_the_default_kernel_is_exact_and_holds_no_per_head_scores(prompt):
    q, k, v, reference = prompt
    with LargestTensor() as watch:
        out = prefill_attention(q, k, v, 0.25, CHUNK)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert watch.bytes < per_head_scores(CHUNK) // 2, watch.op  # at most the [rows, context] mask


def test_long_prefill_on_the_math_path_keeps_scores_within_the_workspace(prompt):
    """PyTorch's math path (what CUDA ran for masked GQA blocks) materialises [heads, rows, context]:
    blocks shrink so that stays within the workspace."""
    q, k, v, reference = prompt
    workspace = 2 * 2**20
    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings(record=True) as caught, LargestTensor() as watch:
        warnings.simplefilter("always")
        out = prefill_attention(q, k, v, 0.25, CHUNK, workspace_bytes=workspace)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert watch.bytes <= workspace, f"{watch.op} made {watch.bytes} bytes"
    assert watch.bytes < per_head_scores(CHUNK) // 8
    assert any("math path" in str(w.message) for w in caught)


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 7), (37, 8), (64, 16)])
def test_short_and_ragged_prompts_match_one_causal_call(length, chunk):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 4, length, 8, generator=g)
    k, v = torch.randn(1, 2, length, 8, generator=g), torch.randn(1, 2, length, 8, generator=g)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(prefill_attention(q, k, v, 0.3, chunk), expected, atol=1e-5, rtol=1e-5)


def test_cuda_kernel_checks_run_with_this_torch():
    """The CUDA-side choice calls torch's own checks; on CPU tensors they answer (False), not raise."""
    q = torch.randn(1, 4, 8, 16)
    assert attention._fused_on_cuda(q, q, q) is False
    bias = attention._lower_right_mask(3, 8, torch.device("cuda"))  # an object only; no CUDA needed
    assert torch.equal(bias._materialize(torch.device("cpu")), attention._lower_right_mask(3, 8, torch.device("cpu")))


def test_masked_decode_with_expanded_groups_equals_gqa(monkeypatch):
    """The CUDA path's fused kernels, run on CPU tensors: expanding the KV groups changes nothing."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(8, 16, generator=g), torch.randn(2, 11, 16, generator=g), torch.randn(2, 11, 16, generator=g)
    valid = torch.rand(2, 11, generator=g) > 0.3
    grouped = attention.fused_decode_attention(q, k, v, valid, 0.25)
    monkeypatch.setattr(attention, "expand_groups_for_masked_decode", lambda device: True)
    torch.testing.assert_close(attention.fused_decode_attention(q, k, v, valid, 0.25), grouped, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_cpu_grouped_decode_equals_the_fused_kernel(dtype, masked, kv_heads):
    """What the CPU runs (two grouped matmuls) against PyTorch's attention, every GQA shape."""
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(8, 32, generator=g).to(dtype)
    k, v = (torch.randn(kv_heads, 300, 32, generator=g).to(dtype) for _ in range(2))
    valid = (torch.rand(kv_heads, 300, generator=g) > 0.5) if masked else None
    if valid is not None:
        valid[:, 0] = True
    expected = attention.fused_decode_attention(q.float(), k.float(), v.float(), valid, 0.2)
    got = decode_attention(q, k, v, valid, 0.2)
    assert got.dtype == dtype and got.shape == (8, 32)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)
