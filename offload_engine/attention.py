"""Attention over the prompt (causal, chunked) and over a decode step's gathered KV."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, chunk: int,
                      window: int | None = None) -> torch.Tensor:
    """Causal attention of a whole prompt for one layer.

    q ``[1, H, T, D]``; k, v ``[1, KvH, T, D]`` -> ``[1, H, T, D]``. Queries are processed in
    chunks of ``chunk`` rows, each against the keys up to its last row, so the score matrix never
    exceeds ``chunk x T`` per head. ``window``: a sliding-window layer, where row ``i`` attends
    keys ``(i - window, i]`` only (transformers' sliding-window mask).
    """
    gqa = q.shape[1] != k.shape[1]
    length = q.shape[2]
    if window is not None and window >= length:
        window = None  # the window drops nothing
    if length <= chunk and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    outputs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        first = 0 if window is None else max(0, start - window + 1)  # keys before it are out of every window
        rows = torch.arange(start, end, device=q.device).unsqueeze(-1)
        cols = torch.arange(first, end, device=q.device)
        allowed = cols <= rows  # [rows, end - first] bottom-right causal
        if window is not None:
            allowed &= cols > rows - window
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, first:end], v[:, :, first:end], attn_mask=allowed, scale=scaling,
            enable_gqa=gqa,
        ))
    return torch.cat(outputs, dim=2)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """One query token over gathered KV.

    q ``[H, D]``; k, v ``[KvH, N, D]``; valid ``[KvH, N]`` bool or None (all valid) -> ``[H, D]``.
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    mask = None
    if valid is not None:
        mask = valid.repeat_interleave(heads // kv_heads, dim=0).unsqueeze(1).unsqueeze(0)  # [1, H, 1, N]
    out = F.scaled_dot_product_attention(
        q.view(1, heads, 1, -1), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scaling,
        enable_gqa=heads != kv_heads,
    )
    return out.view(heads, -1)


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
