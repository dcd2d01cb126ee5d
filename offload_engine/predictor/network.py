"""The TokenButler predictor (arXiv 2503.07518 v2): learned, query-aware token importance.

Producer layers sit every ``G`` layers (0, G, 2G, ...). Producer ``p`` reads the attention input of
the current token at layer ``p`` and emits one small importance query per (consumer layer, attention
head) for its consumers ``p+1 .. p+G`` (clipped at the last layer). Every consumer layer ``l`` has
one learned key projection per KV head, applied to the model's real post-RoPE keys; the projected
keys form the compact key cache (``d'`` numbers per token, layer and KV head). The importance of
token ``t`` for head ``h`` of layer ``l`` is ``q'[l, h] . k'[l, kv(h), t] / sqrt(d')``; with GQA the
scores of a group's query heads are reduced (mean of their softmaxes, or max) so selection is per
(layer, KV head).

The predictor's own query heads (``query_heads``, ``Hq``) are the model's by default. Fewer, down to one
per KV head, each stands for a block of its group's heads and is distilled on their mean attention: a
predictor with one query per KV head scores a token with one product and needs no softmax to rank
(``docs/predictor.md``, "One query per KV head").

Layer 0 has no producer before it: it is not a consumer (``TokenButlerPolicy`` keeps it dense).

Shapes: ``E`` hidden size, ``H`` query heads, ``KvH`` KV heads, ``D`` head dim, ``d'`` = ``dim``,
``T`` tokens, ``R`` query rows, ``Hq`` the predictor's query heads (``query_heads``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..errors import ConfigError
from ..models import ModelDims


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """The model shape a predictor is built for and its own sizes."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    producer_every: int = 4  # G
    dim: int = 16  # d'
    hidden: int = 512  # I, inner width of the query MLP
    rope_pairs: int = 0  # pairs of d' rotated by the predictor's own position (0: none, the first predictors)
    rope_base: float = 10000.0
    query_heads: int | None = None  # Hq, the predictor's query heads; None: the model's num_heads

    def __post_init__(self) -> None:
        if self.num_layers < 2:
            raise ConfigError(f"a TokenButler predictor needs a model with >= 2 layers, got {self.num_layers}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads.")
        for name in ("producer_every", "dim", "hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= 2 * self.rope_pairs <= self.dim:
            raise ConfigError(f"--rope-pairs {self.rope_pairs}: rotate between 0 and d'/2 = {self.dim // 2} pairs "
                              "of the predictor's dimensions.")
        if self.rope_base <= 1:
            raise ConfigError(f"rope_base must be > 1, got {self.rope_base}.")
        if self.query_heads is None:
            object.__setattr__(self, "query_heads", self.num_heads)
        per_kv, blocks = divmod(self.query_heads, self.num_kv_heads) if self.query_heads >= 1 else (0, 1)
        if blocks or per_kv < 1 or self.group_size % per_kv:
            choices = [self.num_kv_heads * q for q in range(1, self.group_size + 1) if self.group_size % q == 0]
            raise ConfigError(f"--query-heads {self.query_heads}: the predictor's query heads must split each of the "
                              f"{self.num_kv_heads} KV groups of {self.group_size} heads evenly; choose one of {choices}.")

    @classmethod
    def for_model(cls, dims: ModelDims, producer_every: int = 4, dim: int = 16, hidden: int = 512,
                  rope_pairs: int = 0, rope_base: float = 10000.0, query_heads: int | None = None):
        return cls(
            num_layers=dims.num_layers,
            num_heads=dims.num_heads,
            num_kv_heads=dims.num_kv_heads,
            head_dim=dims.head_dim,
            hidden_size=dims.hidden_size,
            producer_every=producer_every,
            dim=dim,
            hidden=hidden,
            rope_pairs=rope_pairs,
            rope_base=rope_base,
            query_heads=query_heads,
        )

    @property
    def group_size(self) -> int:
        """The model's query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def query_group(self) -> int:
        """The predictor's query heads per KV head (``Hq / KvH``): scores of a row reduce over these."""
        return self.query_heads // self.num_kv_heads

    @property
    def producers(self) -> tuple[int, ...]:
        """Producer layers 0, G, 2G, ... that have at least one consumer."""
        return tuple(range(0, self.num_layers - 1, self.producer_every))

    def consumers(self, producer: int) -> range:
        """Layers served by ``producer``: ``p+1 .. p+G``, clipped at the last layer."""
        return range(producer + 1, min(producer + self.producer_every, self.num_layers - 1) + 1)

    def producer_of(self, layer: int) -> int | None:
        """The producer serving ``layer`` (None for layer 0)."""
        if layer <= 0:
            return None
        return (layer - 1) // self.producer_every * self.producer_every

    def model_shape(self) -> dict[str, int]:
        """The model shape this predictor fits, as stored in checkpoints."""
        keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def uses_positions(self) -> bool:
        """Whether scores depend on the query's and the keys' positions (``rope_pairs`` > 0)."""
        return self.rope_pairs > 0


def describe_shape(shape: dict[str, int]) -> str:
    """``{'num_layers': 30, ...}`` -> ``'30 layers, 9 heads, 3 KV heads, head_dim 64, hidden 576'``."""
    return (
        f"{shape['num_layers']} layers, {shape['num_heads']} heads, {shape['num_kv_heads']} KV heads, "
        f"head_dim {shape['head_dim']}, hidden {shape['hidden_size']}"
    )


def query_mlp(hidden_size: int, inner: int, out: int) -> nn.Sequential:
    """``LayerNorm(E) -> Linear(E, I) -> SiLU -> Linear(I, out)``, no biases in the linears."""
    return nn.Sequential(
        nn.LayerNorm(hidden_size),
        nn.Linear(hidden_size, inner, bias=False),
        nn.SiLU(),
        nn.Linear(inner, out, bias=False),
    )


class TokenButlerPredictor(nn.Module):
    """Importance queries per producer and key projections per (consumer layer, KV head).

    Parameters: ``queries[i]`` for ``config.producers[i]``; ``key_proj`` ``[L-1, KvH, D, d']`` for
    consumer layers ``1 .. L-1`` (index ``l - 1``).
    """

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        c = config
        self.queries = nn.ModuleList(
            query_mlp(c.hidden_size, c.hidden, len(c.consumers(p)) * c.query_heads * c.dim) for p in c.producers
        )
        key_proj = torch.randn(c.num_layers - 1, c.num_kv_heads, c.head_dim, c.dim) / math.sqrt(c.head_dim)
        self.key_proj = nn.Parameter(key_proj)
        # The rotation's frequencies, once, in float64 (positions up to millions keep their phase); a plain
        # attribute, not a buffer, so that casting the predictor to the model's dtype leaves them exact.
        self._frequencies = c.rope_base ** (-torch.arange(c.rope_pairs, dtype=torch.float64) / max(1, c.rope_pairs))
        self._producer_index = {p: i for i, p in enumerate(c.producers)}

    def is_producer(self, layer: int) -> bool:
        return layer in self._producer_index

    def importance_queries(self, producer: int, x: torch.Tensor, positions: torch.Tensor | int | None = None
                           ) -> torch.Tensor:
        """x ``[..., E]`` (attention input at ``producer``) -> ``[..., n_consumers, Hq, d']``.

        With ``rope_pairs`` the queries are rotated by their token's ``positions`` (``[...]`` or an int)."""
        mlp = self.queries[self._producer_index[producer]]
        out = mlp(x.to(self.key_proj.dtype))
        c = self.config
        out = out.view(*x.shape[:-1], len(c.consumers(producer)), c.query_heads, c.dim)
        if not c.uses_positions:
            return out
        if isinstance(positions, torch.Tensor):
            positions = positions[..., None, None]  # [...] -> over consumers and heads
        return self.rotate(out, positions)

    def project_keys(self, layer: int, k: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """Real post-RoPE keys k ``[KvH, T, D]`` of consumer ``layer`` -> ``[KvH, T, d']``.

        With ``rope_pairs`` the projected keys are rotated by their ``positions`` ``[T]`` (or the
        first position, an int)."""
        projected = self.project_unrotated(layer, k)
        if not self.config.uses_positions:
            return projected
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + k.shape[-2], device=k.device)
        return self.rotate(projected, positions)

    def key_projections_at(self, position: int) -> torch.Tensor:
        """Every consumer layer's key projection with the rotation of ``position`` folded in:
        ``[L-1, KvH, D, d']``, so that ``k @ key_projections_at(p)[layer - 1]`` is ``project_keys(layer, k, p)``
        for keys at position ``p`` (to float rounding). A decode step's keys are all at one position: one
        product per step, then one per layer, where ``project_keys`` takes a projection and a rotation's
        half-dozen operations per layer."""
        if not self.config.uses_positions:
            return self.key_proj.detach()
        # rotate() is linear in its vectors: the rotation of x is x @ M, M's rows the rotations of the unit vectors
        eye = torch.eye(self.config.dim, dtype=self.key_proj.dtype, device=self.key_proj.device)
        return torch.matmul(self.key_proj.detach(), self.rotate(eye, position))

    def project_unrotated(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Keys ``[..., D]`` of consumer ``layer`` through its projection, not yet turned by position:
        ``[..., d']`` (``project_keys`` without ``rotate``; a paged cache keeps them so and turns them by
        their distance to the query when it scores)."""
        return torch.matmul(k.to(self.key_proj.dtype), self.key_proj[layer - 1])

    def rotate(self, vectors: torch.Tensor, positions: torch.Tensor | int | None) -> torch.Tensor:
        """Rotary position of the predictor's own: the first ``2 r`` of ``d'`` dims, pairs ``(i, i + r)``
        turned by ``position x base^(-i/r)`` (wavelengths from 2 pi to 2 pi base^((r-1)/r) tokens), the
        rest untouched. vectors ``[..., d']``, positions broadcastable to ``vectors.shape[:-1]`` (or one int).

        Scores ``q'(p) . k'(t)`` of rotated queries and keys then depend on ``t - p`` in the rotated
        part, so the predictor can prefer recent tokens at any absolute position (the model's own
        RoPE makes its attention relative; a predictor without it learns absolute phases)."""
        if positions is None:
            raise ValueError("this predictor rotates by position (rope_pairs > 0): pass the tokens' positions")
        r = self.config.rope_pairs
        if self._frequencies.device != vectors.device:  # moved once per device, not per call
            self._frequencies = self._frequencies.to(vectors.device)
        frequencies = self._frequencies
        if isinstance(positions, int):
            angles = (positions * frequencies).float()  # [r]
        else:
            angles = (positions.to(vectors.device, torch.float64).unsqueeze(-1) * frequencies).float()  # [..., r]
        cos, sin = angles.cos().to(vectors.dtype), angles.sin().to(vectors.dtype)
        first, second, rest = vectors[..., :r], vectors[..., r : 2 * r], vectors[..., 2 * r :]
        return torch.cat([first * cos - second * sin, first * sin + second * cos, rest], dim=-1)

    def project_head_rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Key-space vectors per predictor query head, e.g. the teacher's mixed keys pooled by ``pool_heads``,
        ``[Hq, R, D]`` -> ``[Hq, R, d']`` through the key projection of each head's KV group at consumer ``layer``."""
        kvh, heads = self.config.num_kv_heads, self.config.query_heads
        grouped = rows.to(self.key_proj.dtype).reshape(kvh, heads // kvh * rows.shape[1], -1)  # [KvH, Gq*R, D]
        return torch.matmul(grouped, self.key_proj[layer - 1]).view(heads, rows.shape[1], -1)

    def pool_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """The model's per-head teacher rows ``[H, ...]`` (attention rows or mixed keys, linear in the rows) ->
        ``[Hq, ...]``: each predictor query head's target is the mean over the model heads it stands for
        (consecutive blocks of ``H / Hq`` heads, within one KV group). The same tensor when ``Hq = H``."""
        c = self.config
        if c.query_heads == c.num_heads:
            return per_head
        return per_head.reshape(c.query_heads, c.num_heads // c.query_heads, *per_head.shape[1:]).mean(dim=1)

    def expand_heads(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """Per predictor query head ``[Hq, ...]`` -> per model head ``[H, ...]``, each model head taking the
        scores of the query head that stands for it (``pool_heads``' blocks). The same tensor when ``Hq = H``."""
        c = self.config
        if c.query_heads == c.num_heads:
            return per_query_head
        return per_query_head.repeat_interleave(c.num_heads // c.query_heads, dim=0)

    def head_scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Per-query-head logits. queries ``[R, Hq, d']``, keys ``[KvH, T, d']`` -> ``[Hq, R, T]``.

        Each query head scores the projected keys of its KV group; no mask is applied.
        """
        kvh, g = self.config.num_kv_heads, self.config.query_group
        q = queries.to(keys.dtype).permute(1, 0, 2).reshape(kvh, g * queries.shape[0], -1)  # [KvH, Gq*R, d']
        q = q * (1.0 / math.sqrt(self.config.dim))  # scaled here: R x d' numbers, not R x T logits
        logits = torch.matmul(q, keys.transpose(-1, -2))  # [KvH, Gq*R, T]
        return logits.view(self.config.query_heads, queries.shape[0], keys.shape[1])

    def group_max(self, scores: torch.Tensor) -> torch.Tensor:
        """Reduce per-query-head scores ``[Hq, ...]`` to per-KV-head scores ``[KvH, ...]`` by max."""
        kvh, g = self.config.num_kv_heads, self.config.query_group
        return scores.view(kvh, g, *scores.shape[1:]).amax(dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def seeded_random_predictor(config: PredictorConfig, seed: int = 0) -> TokenButlerPredictor:
    """A predictor of random weights drawn from ``seed``, the global generator left as it was: its
    selections mean nothing, its cost is that of a trained one of the same sizes (for timing)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TokenButlerPredictor(config)
    finally:
        torch.random.set_rng_state(state)


def pool_query_heads(predictor: TokenButlerPredictor, query_heads: int) -> TokenButlerPredictor:
    """A predictor with ``query_heads`` query heads whose queries are the means of ``predictor``'s over the
    blocks of its heads each new head stands for (``pool_heads``' blocks): its logits are the means of the
    old heads' logits. A start for training fewer query heads (``--init`` with ``--query-heads``); the same
    predictor when the count is its own. Key projections are shared as they are."""
    c = predictor.config
    if query_heads == c.query_heads:
        return predictor
    block = c.query_heads // query_heads if query_heads >= 1 else 0
    if block * query_heads != c.query_heads:
        raise ConfigError(f"cannot pool {c.query_heads} query heads into {query_heads}: it must divide them.")
    pooled = TokenButlerPredictor(replace(c, query_heads=query_heads)).to(predictor.key_proj.device,
                                                                         predictor.key_proj.dtype)
    state = predictor.state_dict()
    for index, producer in enumerate(c.producers):
        name = f"queries.{index}.3.weight"  # the second Linear: [n_consumers * Hq * d', I]
        weight = state[name].view(len(c.consumers(producer)), query_heads, block, c.dim, -1).mean(dim=2)
        state[name] = weight.reshape(-1, weight.shape[-1])
    pooled.load_state_dict(state)
    return pooled


def widen_hidden(predictor: TokenButlerPredictor, hidden: int, seed: int = 0) -> TokenButlerPredictor:
    """A predictor whose query MLPs are ``hidden`` wide (at least its own width) and compute what
    ``predictor``'s do: the old units are kept, the new ones get fresh input weights (drawn from ``seed``)
    and zero output weights, so they start silent and learn from the first step. A start for a wider
    predictor (``--init`` with a larger ``--hidden``); the same predictor when the width is its own."""
    c = predictor.config
    if hidden == c.hidden:
        return predictor
    if hidden < c.hidden:
        raise ConfigError(f"cannot narrow a predictor's query MLPs from {c.hidden} to {hidden} units.")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        wider = TokenButlerPredictor(replace(c, hidden=hidden)).to(predictor.key_proj.device, predictor.key_proj.dtype)
    finally:
        torch.random.set_rng_state(state)
    new = wider.state_dict()
    for name, old in predictor.state_dict().items():
        if name.endswith(".1.weight"):  # the first Linear [I, E]: the old units' rows, new rows as drawn
            new[name][: c.hidden] = old
        elif name.endswith(".3.weight"):  # the second Linear [out, I]: the new units' columns silent
            new[name].zero_()
            new[name][:, : c.hidden] = old
        else:
            new[name] = old
    wider.load_state_dict(new)
    return wider


def quantize_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (KV head, token): keys ``[..., d']`` -> (int8 ``[..., d']``, fp16 scale ``[...]``)."""
    scale = int8_scale(keys)
    return torch.round(keys.float() / scale.unsqueeze(-1)).to(torch.int8), scale.to(torch.float16)


def quantize_query(queries: torch.Tensor) -> torch.Tensor:
    """The query ``[..., d']`` as the native CPU kernel scores int8 keys with it where the CPU has AVX512-VNNI
    (``SelectionKernels.int8_quad_products``): each head's vector quantised by ``quantize_keys``' rule in
    float32, but its scale kept in float32; returned as codes times scale (float32), the numbers the kernel
    multiplies."""
    scale = int8_scale(queries).unsqueeze(-1)
    return torch.round(queries.float() / scale).clamp(-127, 127) * scale


def int8_scale(x: torch.Tensor) -> torch.Tensor:
    """The symmetric int8 scale of each vector of ``x [..., d']``, float32 ``[...]``: max |x| / 127 (at least
    1e-8 / 127, so that a zero vector quantises to zeros); the rule of ``quantize_keys`` and ``quantize_query``
    and of the native kernels' ``quantise_head``."""
    return x.float().abs().amax(dim=-1).clamp_min(1e-8) / 127.0


def dequantize_keys(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_keys``: float32 ``[..., d']``."""
    return quantized.float() * scale.float().unsqueeze(-1)
