"""Attention statistics recomputed from q and k, for policies that score tokens by attention.

The engine's attention kernels never materialise the prompt's attention matrix; H2O, SnapKV and
the oracle recompute what they need from the post-RoPE queries and keys, a bounded block at a time.
Shapes: ``H`` query heads, ``KvH`` KV heads, ``G = H / KvH``; query head ``h`` belongs to KV head
``h // G`` (the layout of transformers' ``repeat_kv``).
"""

from __future__ import annotations

import torch

from .base import NEVER


def grouped_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled logits per KV group: q ``[H, r, D]``, k ``[KvH, c, D]`` -> ``[KvH, G, r, c]`` float32."""
    heads, rows, dim = q.shape
    kv_heads = k.shape[0]
    grouped = q.to(torch.float32).view(kv_heads, heads // kv_heads, rows, dim)
    return torch.einsum("kgrd,kcd->kgrc", grouped, k.to(torch.float32)) * scaling


def causal_probs(q: torch.Tensor, k: torch.Tensor, first_row: int, scaling: float) -> torch.Tensor:
    """Causal softmax of the queries at positions ``first_row..first_row+r-1`` over keys ``0..c-1``.

    q ``[H, r, D]``, k ``[KvH, c, D]`` -> probabilities ``[KvH, G, r, c]`` float32.
    """
    logits = grouped_logits(q, k, scaling)
    rows = torch.arange(first_row, first_row + q.shape[1], device=q.device).unsqueeze(-1)
    cols = torch.arange(k.shape[1], device=q.device)
    return torch.softmax(logits.masked_fill(cols > rows, NEVER), dim=-1)


def causal_column_sums(q: torch.Tensor, k: torch.Tensor, scaling: float, chunk_elements: int) -> torch.Tensor:
    """Attention received by each prompt token: q ``[H, T, D]``, k ``[KvH, T, D]`` -> ``[H, T]`` float32.

    The column sums of the prompt's causal attention. Query rows go in chunks so that at most about
    ``chunk_elements`` logits exist at once; rows ``[r0, r1)`` only need keys ``[0, r1)``.
    """
    heads, length, _ = q.shape
    rows = max(1, chunk_elements // max(1, heads * length))
    keys = k.to(torch.float32)
    sums = torch.zeros(heads, length, dtype=torch.float32, device=q.device)
    for r0 in range(0, length, rows):
        r1 = min(length, r0 + rows)
        probs = causal_probs(q[:, r0:r1], keys[:, :r1], r0, scaling)  # [KvH, G, r, r1]
        sums[:, :r1] += probs.sum(dim=2).reshape(heads, r1)
    return sums


def group_mean(per_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average over the query heads of each KV group: ``[H, n]`` -> ``[KvH, n]``."""
    return per_head.view(kv_heads, -1, per_head.shape[-1]).mean(dim=1)
