"""Attention over the prompt (causal, chunked) and over a decode step's gathered KV."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import causal_lower_right

from . import native

# Bound on the scores a prefill block may materialise when PyTorch can only run its math path
# (no fused kernel for these shapes, dtype or device): [heads, rows, context] fp32 and the softmax
# beside it. The fused kernels (flash, memory-efficient, CPU flash) never materialise scores.
PREFILL_WORKSPACE_BYTES = 2**30
MATH_BYTES_PER_SCORE = 12  # fp32 scores, fp32 probabilities, and the mask or its float form


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, chunk: int,
                      workspace_bytes: int = PREFILL_WORKSPACE_BYTES, window: int | None = None) -> torch.Tensor:
    """Causal attention of a whole prompt for one layer.

    q ``[1, H, T, D]``; k, v ``[1, KvH, T, D]`` -> ``[1, H, T, D]``. Queries go in blocks of
    ``chunk`` rows, each against the keys up to its last row, with the causal mask aligned to the
    bottom right and never materialised per head: on CUDA a ``causal_lower_right`` bias, which
    PyTorch runs on the flash or memory-efficient kernel (KV groups expanded for the latter); on
    CPU a ``[rows, end]`` boolean mask for CPU flash. When only the math path can run, blocks
    shrink so their scores stay within ``workspace_bytes``. ``window``: a sliding-window layer, row
    ``i`` attends keys ``(i - window, i]`` only (transformers' sliding-window mask).
    """
    heads, length = q.shape[1], q.shape[2]
    if heads != k.shape[1] and q.device.type == "cuda":
        # Equal heads make both fused kernels eligible (memory-efficient has no GQA). A copy of
        # [1, H, T, D] once per layer: 2 GiB for Llama-3.1-8B at 128k in bf16.
        k, v = expand_kv_groups(k, heads), expand_kv_groups(v, heads)
    rows = chunk if _fused_available(q, k, v, chunk, scaling) else _math_rows(heads, length, chunk, workspace_bytes)
    if window is not None and window < length:
        outputs = [_window_block(q[:, :, start:min(start + rows, length)], k, v, start, scaling, window)
                   for start in range(0, length, rows)]
    else:
        outputs = [_causal_block(q[:, :, start:min(start + rows, length)], k, v, start, scaling)
                   for start in range(0, length, rows)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _window_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scaling: float,
                  window: int) -> torch.Tensor:
    """Query rows ``[start, start + rows)`` against keys ``(row - window, row]``: keys before
    ``start - window + 1`` are out of every row's window and are not read."""
    rows = q.shape[2]
    end, first = start + rows, max(0, start - window + 1)
    positions = torch.arange(start, end, device=q.device).unsqueeze(-1)
    cols = torch.arange(first, end, device=q.device)
    allowed = (cols <= positions) & (cols > positions - window)  # [rows, end - first]
    return F.scaled_dot_product_attention(q, k[:, :, first:end], v[:, :, first:end], attn_mask=allowed,
                                          scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def continuation_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, chunk: int,
                           workspace_bytes: int = PREFILL_WORKSPACE_BYTES) -> torch.Tensor:
    """Causal attention of new tokens that continue a cached prefix (prefix reuse).

    q ``[1, H, N, D]`` at positions ``[P, P + N)``; k, v ``[1, KvH, P + N, D]`` (the prefix's cached
    KV followed by the new tokens') -> ``[1, H, N, D]``. The same lower-right causal blocks as
    ``prefill_attention``, offset by the prefix length ``P`` (>= 1).
    """
    heads, new, total = q.shape[1], q.shape[2], k.shape[2]
    prefix = total - new
    if heads != k.shape[1] and q.device.type == "cuda":
        k, v = expand_kv_groups(k, heads), expand_kv_groups(v, heads)
    rows = chunk if _fused_available(q, k, v, chunk, scaling) else _math_rows(heads, total, chunk, workspace_bytes)
    outputs = [_causal_block(q[:, :, start:min(start + rows, new)], k, v, prefix + start, scaling)
               for start in range(0, new, rows)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def expand_kv_groups(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """``[1, KvH, T, D]`` -> ``[1, H, T, D]``, each KV head repeated for its query heads (a copy)."""
    return kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _causal_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
    """Query rows ``[start, start + rows)`` (q ``[1, H, rows, D]``) against keys ``[0, start + rows)``."""
    rows = q.shape[2]
    end = start + rows
    k, v = k[:, :, :end], v[:, :, :end]
    gqa = q.shape[1] != k.shape[1]
    if start == 0:  # square: the usual top-left causal mask is the right one
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right_mask(rows, end, q.device), scale=scaling,
                                          enable_gqa=gqa)


def _lower_right_mask(rows: int, end: int, device: torch.device):
    """Row i may see keys ``<= end - rows + i``: a bias object on CUDA (no tensor), else ``[rows, end]`` bool."""
    if device.type == "cuda":
        return causal_lower_right(rows, end)
    return torch.arange(end, device=device) <= torch.arange(end - rows, end, device=device).unsqueeze(-1)


def _fused_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, scaling: float) -> bool:
    """Whether a fused kernel (no materialised scores) runs a rectangular block of these inputs."""
    rows = min(chunk, q.shape[2])
    end = min(2 * rows, q.shape[2])
    block = (q[:, :, :rows], k[:, :, :end], v[:, :, :end])
    if q.device.type == "cuda":
        return _fused_on_cuda(*block)
    mask = _lower_right_mask(rows, end, q.device)
    choice = torch._fused_sdp_choice(*block, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scaling,
                                     enable_gqa=q.shape[1] != k.shape[1])
    return choice != SDPBackend.MATH.value


def _fused_on_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The checks ``causal_lower_right`` makes before taking the flash or memory-efficient kernel
    (q, k, v with equal heads)."""
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    params = SDPAParams(q, k, v, None, 0.0, False, False)
    return bool(can_use_flash_attention(params) or can_use_efficient_attention(params))


def _math_rows(heads: int, length: int, chunk: int, workspace_bytes: int) -> int:
    """Query rows per block so that the math path's scores fit ``workspace_bytes``."""
    rows = max(1, min(chunk, workspace_bytes // (heads * length * MATH_BYTES_PER_SCORE)))
    warnings.warn(f"prefill attention: no fused attention kernel for these inputs; PyTorch's math path runs "
                  f"in blocks of {rows} query rows to bound its scores", stacklevel=3)
    return rows


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """One query token over gathered KV.

    q ``[H, D]``; k, v ``[KvH, N, D]``; valid ``[KvH, N]`` bool or None (all valid) -> ``[H, D]``.
    On the CPU the native kernel (``native.SelectionKernels.decode_attention``: one pass over the keys
    and one over the values, 0.5-0.8x the time of ``grouped_decode_attention`` at 2k-32k tokens,
    ``bench/reports/decode_attention_cpu.md``) where it is built and applies, else
    ``grouped_decode_attention``; elsewhere ``fused_decode_attention``.
    """
    if q.device.type == "cpu":
        kernels = native.kernels()
        out = kernels.decode_attention(q, k, v, valid, scaling) if kernels is not None else None
        return out if out is not None else grouped_decode_attention(q, k, v, valid, scaling)
    return fused_decode_attention(q, k, v, valid, scaling)


def fused_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                           scaling: float) -> torch.Tensor:
    """``decode_attention`` on PyTorch's fused kernels (the CUDA path). Without a mask (dense modes)
    GQA runs on the flash kernel. With one (sparse mode), flash does not apply and the
    memory-efficient kernel has no GQA: the KV groups are expanded first (N is the small working
    set) so the sparse mode gets a fused kernel too, not the math path.
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    mask = None
    if valid is not None:
        mask = valid.repeat_interleave(heads // kv_heads, dim=0).unsqueeze(1).unsqueeze(0)  # [1, H, 1, N]
        if heads != kv_heads and expand_groups_for_masked_decode(q.device):
            k, v = expand_kv_groups(k.unsqueeze(0), heads)[0], expand_kv_groups(v.unsqueeze(0), heads)[0]
            kv_heads = heads
    out = F.scaled_dot_product_attention(
        q.view(1, heads, 1, -1), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scaling,
        enable_gqa=heads != kv_heads,
    )
    return out.view(heads, -1)


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                             scaling: float) -> torch.Tensor:
    """``decode_attention`` as two batched matmuls over the KV groups, the form the CPU runs fastest.

    q ``[H, D]``; k, v ``[KvH, N, D]``; valid ``[KvH, N]`` or None -> ``[H, D]``. Each KV head's keys
    are read once for its whole group of query heads and nothing is expanded; scores ``[KvH, G, N]``
    are one query's, small. On one CPU thread this takes 0.4-0.6x the time of PyTorch's fused kernel
    at 8k-32k tokens, 0.6-0.9x at 2k (``bench/reports/decode_attention_cpu.md``); softmax runs in float32.
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    grouped = q.view(kv_heads, heads // kv_heads, q.shape[-1]).to(k.dtype)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float().mul_(scaling)  # [KvH, G, N]
    if valid is not None:
        scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v).view(heads, v.shape[-1])


def expand_groups_for_masked_decode(device: torch.device) -> bool:
    """Whether masked decode attention expands KV groups: on CUDA (see ``fused_decode_attention``)."""
    return device.type == "cuda"


def attention_weights(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Softmax weights of one query, averaged over each KV group's query heads.

    q ``[H, D]``; k ``[KvH, N, D]``; valid ``[KvH, N]`` or None -> ``[KvH, N]`` float32 (0 where invalid).
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    grouped = q.view(kv_heads, heads // kv_heads, -1).float()
    logits = torch.einsum("kgd,knd->kgn", grouped, k.float()) * scaling
    if valid is not None:
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
