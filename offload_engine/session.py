"""A sequence kept alive across requests, so a prompt that starts with the cached tokens prefills
only what is new (prefix reuse, for ``tbrun serve``).

A chat that goes on sends, at every turn, the previous prompt, the previous answer and the new
message. The session keeps the backend of the last generation (its KV of the prompt and of the
answer) and the token ids that KV belongs to. The next prompt's longest common prefix with those
ids is kept (``backend.rewind``); only the tokens after it are run through the layers, each layer's
new queries attending to the cached prefix KV and to their own (``continuation_attention``).

Every backend can rewind, reading the prefix KV back from where it keeps it (the host store in
the offload modes). Sparse offload also rebuilds its working set and its policy's state for the
kept prefix, and offers for reuse only positions whose KV a prefill would have computed
(``backend.reusable_tokens``): tokens decoded while layers selected were made from sparse
attention, so they are prefilled again and the answer stays the one a fresh prefill of the whole
conversation gives. Where a backend cannot rewind (sliding-window layers; a policy whose state
comes from the prompt's attention, H2O or SnapKV) every request is a full prefill and
``PrefixReuse.note`` says why. Batch size 1: one caller at a time (the server's worker thread).

The session owns the engine's policy object while it holds a sparse backend (the backend bound
it): do not run ``Engine.generate`` on the same engine meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .attention import continuation_attention
from .backends.base import KVBackend
from .config import SamplingConfig
from .engine import Engine, GenerationResult, ProgressCallback, TokenCallback, _chunked_finish, _chunked_qkv
from .profiling import PhaseClock, timed_breakdown
from .stats import GenerationStats, peak_device_bytes, peak_host_bytes

NO_REUSE_NOTE = "prefix reuse is not available in {mode} mode ({reason}): every request prefills its whole prompt"


class StopGeneration(Exception):
    """Raised by an ``on_token`` or ``on_prefill`` callback to end a generation now.

    ``reason`` becomes the finish reason: ``"stop"`` (a stop string was produced; the KV is
    kept for reuse) or ``"cancelled"`` (the client left; the KV is freed).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class PrefixReuse:
    """How much of a prompt was already in the cache: ``reused_tokens`` are the prefill tokens saved."""

    reused_tokens: int = 0
    prefilled_tokens: int = 0
    note: str = ""


class Session:
    """The KV of the last generation, kept for the next one; ``close()`` frees it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._backend: KVBackend | None = None
        self._cached: list[int] = []  # the tokens whose KV the backend holds, positions 0..n-1

    @property
    def cached_tokens(self) -> int:
        return len(self._cached)

    def close(self) -> None:
        """Free the cached KV (pinned host memory included)."""
        backend, self._backend, self._cached = self._backend, None, []
        if backend is not None:
            backend.close()

    def generate(self, prompt_ids, sampling: SamplingConfig | None = None, on_token: TokenCallback | None = None,
                 on_prefill: ProgressCallback | None = None) -> tuple[GenerationResult, PrefixReuse]:
        """``Engine.generate`` over the cached prefix; callbacks may raise ``StopGeneration``."""
        engine, sampling = self.engine, sampling or SamplingConfig()
        prompt = engine._check_prompt(prompt_ids)
        stats = GenerationStats(mode=engine.config.mode.value, policy=engine.policy_name, prompt_tokens=len(prompt))
        clock = PhaseClock(engine.config.profile, engine.device)
        backend, reuse = self._backend_for(prompt, clock)
        generated: list[int] = []
        generator = torch.Generator(device=engine.device).manual_seed(sampling.seed)
        try:
            with torch.inference_mode():
                if reuse.reused_tokens:
                    logits = self._prefill_continuation(prompt, reuse.reused_tokens, backend, stats, on_prefill)
                else:
                    logits = engine._prefill(prompt, backend, stats, on_prefill)
                reason = engine._decode_loop(prompt, logits, backend, sampling, generator, generated, stats,
                                             on_token, clock)
        except StopGeneration as stop:
            reason = stop.reason
        except BaseException:
            self.close()
            raise
        stats.h2d_bytes = backend.h2d_bytes_per_step()[: len(stats.decode_ms)]
        stats.notes = list(backend.notes) + ([reuse.note] if reuse.note else [])
        stats.interrupted = reason == "cancelled"
        if engine.config.profile:  # as Engine.generate reports it: this generation's own clock
            stats.step_phases_ms = clock.steps_ms()
            stats.breakdown = timed_breakdown([(stats.step_phases_ms, stats.decode_ms)], skip=0)
        self._keep(prompt, generated, reason)
        stats.new_tokens = len(generated)
        stats.predictor = engine.predictor_source
        stats.compact_keys = engine.compact_key_dtype
        stats.peak_host_bytes = peak_host_bytes()
        stats.peak_device_bytes = peak_device_bytes(engine.device)
        return GenerationResult(generated, engine._decode_text(generated), prompt, reason, stats), reuse

    # -------------------------------------------------------------------------- internals
    def _backend_for(self, prompt: list[int], clock: PhaseClock) -> tuple[KVBackend, PrefixReuse]:
        """The cached backend rewound to the prompt's common prefix with the cache, or a new one.

        At least the prompt's last token is always prefilled: its logits start the decode.
        """
        reused = min(_common_prefix(self._cached, prompt), len(prompt) - 1)
        self._cached = []  # stale from here until this generation ends
        varying = self.engine.adapter.rope_varies_with_length(self.engine.config.context)
        if self._backend is not None and not varying and self._backend.rewind(reused):
            self._backend.use_clock(clock)  # this generation's phases (its selections bind again after the rewind)
            return self._backend, PrefixReuse(reused, len(prompt) - reused)
        self.close()
        self._backend = self.engine._new_backend(clock)
        reason = ("the model's dynamic RoPE rescales every position once the sequence passes its trained length"
                  if varying else self._backend.cannot_rewind())
        note = NO_REUSE_NOTE.format(mode=self.engine.config.mode.value, reason=reason) if reason else ""
        return self._backend, PrefixReuse(0, len(prompt), note)

    def _keep(self, prompt: list[int], generated: list[int], reason: str) -> None:
        """Remember which tokens the KV holds: the prompt and every generated token but the last
        (the last one was sampled, never fed) that it offers for reuse. A cancelled generation, or
        a backend that could not continue anyway, frees its KV now."""
        cached = prompt + generated[:-1]
        cached = cached[: self._backend.reusable_tokens(len(cached))]
        if reason == "cancelled" or not self._backend.rewind(len(cached)):
            self.close()
            return
        self._cached = cached

    def _prefill_continuation(self, prompt: list[int], reused: int, backend: KVBackend, stats: GenerationStats,
                              on_prefill: ProgressCallback | None) -> torch.Tensor:
        """Run ``prompt[reused:]`` layer by layer over the cached KV of ``prompt[:reused]``.

        Per layer: the new tokens' q/k/v at positions ``[reused, len(prompt))``, the prefix's k/v
        from the backend (``[KvH, reused, D]``; read back from the host store in dense offload),
        attention of the new queries over both. Returns the last position's logits ``[V]``.
        """
        start = time.perf_counter()
        adapter, chunk, device = self.engine.adapter, self.engine.config.prefill_chunk, self.engine.device
        hidden = adapter.embed(torch.tensor([prompt[reused:]], device=device))  # [1, N, E]
        rope = adapter.rope(hidden, torch.arange(reused, len(prompt), device=device).unsqueeze(0))
        for layer in range(adapter.dims.num_layers):
            x = adapter.attention_input(layer, hidden)
            q, k, v = _chunked_qkv(adapter, layer, x, rope, chunk)  # q [1, H, N, D]; k, v [1, KvH, N, D]
            past_k, past_v = backend.prefix_kv(layer, reused)  # [KvH, P, D]
            keys = torch.cat([past_k.unsqueeze(0), k], dim=2)  # [1, KvH, P + N, D]
            values = torch.cat([past_v.unsqueeze(0), v], dim=2)
            stats.prefill_peak_kv_bytes = max(stats.prefill_peak_kv_bytes,
                                              backend.device_kv_bytes() + keys.nbytes + values.nbytes)
            backend.extend_layer(layer, reused, x[0], q[0], k[0], v[0])
            out = continuation_attention(q, keys, values, adapter.scaling, chunk)
            hidden = _chunked_finish(adapter, layer, hidden, out, chunk)
            if on_prefill is not None:
                on_prefill(layer + 1, adapter.dims.num_layers)
        logits = adapter.logits(hidden[:, -1:])[0, -1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the prefill time covers the queued work
        stats.prefill_seconds = time.perf_counter() - start
        return logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(diff[0, 0]) if len(diff) else n
