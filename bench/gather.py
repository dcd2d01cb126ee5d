"""The gather methods on their own: one layer's selected K fragments from a pinned host store.

Each method gathers ``budget`` random tokens per KV head from a ``[KvH, context, D]`` store (a
view of token-major ``[context, KvH, D]`` memory, the host store's layout) into
a device buffer, ``repeats`` times after a warm-up; the time of each call is taken with CUDA
events on the current stream (wall clock on the CPU). The rates are set against two references
measured in the same run: the pinned memcpy peak (one large contiguous copy) and a contiguous
copy of the same number of bytes as one gather (the best any gather of this size could do).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from offload_engine.cpu_cache.gather import INDEX, available_gather_methods, choose_gather_method, gather_fragments
from offload_engine.cpu_cache.host_store import allocate_host, check_host_memory
from offload_engine.errors import ConfigError
from offload_engine.memory import dtype_name

from .report import fmt, machine_header, markdown_header, markdown_table, provenance, summarize_ms, write_json

FILL_CHUNK = 65536  # tokens of the store filled with random values at a time


@dataclass(slots=True)
class GatherSettings:
    context: int = 131072
    budget: int = 2048
    kv_heads: int = 8
    head_dim: int = 128
    repeats: int = 50
    warmup: int = 5
    device: str = "cuda"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget", "kv_heads", "head_dim", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.budget > self.context:
            raise ConfigError(f"--budget {self.budget} is above --context {self.context}: gather at most every token.")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32


def selection(settings: GatherSettings, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """positions ``[KvH, budget]`` (distinct random tokens, sorted, last token included), slots."""
    g = torch.Generator().manual_seed(settings.seed)
    rows = [torch.randperm(settings.context - 1, generator=g)[: settings.budget - 1] for _ in range(settings.kv_heads)]
    last = torch.full((1,), settings.context - 1)
    positions = torch.stack([torch.cat([r, last]).sort().values for r in rows])
    slots = torch.arange(settings.budget).expand(settings.kv_heads, -1).contiguous()
    return positions.to(device), slots.to(device)


def time_calls(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``fn``: CUDA events on the current stream, or wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000.0 * (time.perf_counter() - begin))
    return times


def run_gather(settings: GatherSettings, out_dir: Path) -> dict:
    """Time every available method; write ``gather-<device>.{json,md}``; return the report."""
    device = torch.device(settings.device)
    shape = (settings.context, settings.kv_heads, settings.head_dim)  # token-major, as in the host store
    item = torch.empty((), dtype=settings.dtype).element_size()
    check_host_memory(settings.kv_heads * settings.context * settings.head_dim * item, "the gather benchmark's store")
    storage = allocate_host(shape, settings.dtype, pin=device.type == "cuda")
    for token in range(0, settings.context, FILL_CHUNK):  # in chunks: a float32 temporary of the whole store may not fit
        part = storage[token: token + FILL_CHUNK]
        part.copy_(torch.randn(part.shape, dtype=torch.float32).to(settings.dtype))
    store = storage.transpose(0, 1)  # [KvH, C, D], the gather source
    positions, slots = selection(settings, device)
    counts = torch.full((settings.kv_heads,), settings.budget, device=device)  # every entry real
    dst = torch.zeros(settings.kv_heads, settings.budget + 1, settings.head_dim, dtype=settings.dtype, device=device)
    expected = torch.zeros_like(dst)
    gather_fragments(store, positions, slots, expected, INDEX, counts)
    nbytes = settings.kv_heads * settings.budget * settings.head_dim * item
    rows = [_method_row(m, (store, positions, slots, dst, m, counts), expected, nbytes, settings, device)
            for m in available_gather_methods(device)]
    method, reason = choose_gather_method(device)
    report = {
        "benchmark": "gather",
        "provenance": provenance(),
        "machine": machine_header(device),
        "settings": asdict(settings) | {"dtype": dtype_name(settings.dtype),
                                        "bytes_per_gather": nbytes},
        "default_method": method,
        "default_method_reason": reason,
        "references": _references(nbytes, settings, device),
        "rows": rows,
    }
    stem = f"gather-{device.type}"
    files = {"json": str(out_dir / f"{stem}.json"), "md": str(out_dir / f"{stem}.md")}
    report["files"] = {kind: Path(path).name for kind, path in files.items()}  # no local path in the report
    write_json(Path(files["json"]), report)
    Path(files["md"]).write_text(to_markdown(report))
    report["files"] = files  # the caller's view: where they are on this machine
    return report


def _method_row(method, call, expected, nbytes, settings, device) -> dict:
    """``call``: the arguments of ``gather_fragments`` (src, positions, slots, dst, method, counts)."""
    row = {"method": method}
    dst = call[3]
    try:
        dst.zero_()
        gather_fragments(*call)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # read the result back for the correctness check
        row["agrees_with_index"] = bool(torch.equal(dst[:, :-1].cpu(), expected[:, :-1].cpu()))
        times = time_calls(lambda: gather_fragments(*call), device,
                           settings.repeats, settings.warmup)
        row.update(summarize_ms(times))
        row["gbps"] = nbytes / (row["median_ms"] / 1000.0) / 1e9
    except Exception as exc:  # report the failure and go on with the other methods
        row.update(error=f"{type(exc).__name__}: {exc}")
    return row


def _references(nbytes: int, settings: GatherSettings, device: torch.device) -> dict:
    """Pinned memcpy peak, and a contiguous pinned copy of ``nbytes`` (CUDA only)."""
    if device.type != "cuda":
        return {"memcpy_peak_gbps": None, "contiguous_same_bytes_gbps": None}
    from offload_engine.machine import measure_h2d_gbps

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = time_calls(lambda: target.copy_(host, non_blocking=True), device, settings.repeats, settings.warmup)
    same = summarize_ms(times)["median_ms"]
    return {"memcpy_peak_gbps": measure_h2d_gbps(size_bytes=512 * 2**20),
            "contiguous_same_bytes_gbps": nbytes / (same / 1000.0) / 1e9}


def to_markdown(report: dict) -> str:
    s, ref = report["settings"], report["references"]
    peak = ref["memcpy_peak_gbps"]
    rows = []
    for r in report["rows"]:
        if "error" in r:
            rows.append([r["method"], "-", "-", "-", "-", "-", r["error"]])
            continue
        share = f"{100 * r['gbps'] / peak:.0f}%" if peak else "-"
        rows.append([r["method"], fmt(r["median_ms"], 3), fmt(r["p90_ms"], 3), fmt(r["gbps"], 2), share,
                     "yes" if r["agrees_with_index"] else "NO", ""])
    lines = [
        markdown_header("Gather methods: selected fragments from pinned host memory", report), "",
        f"{s['kv_heads']} KV heads x {s['budget']} random tokens of {s['head_dim']} x {s['dtype']} from a "
        f"{s['context']:,}-token store: {s['bytes_per_gather'] / 2**20:.2f} MiB per gather (one layer's K). "
        f"{s['repeats']} timed calls after {s['warmup']} warm-up. Default method here: {report['default_method']} "
        f"({report.get('default_method_reason', 'reason not recorded')}).",
        f"References: pinned memcpy peak {fmt(peak, 1)} GB/s; one contiguous copy of the same bytes "
        f"{fmt(ref['contiguous_same_bytes_gbps'], 1)} GB/s.", "",
        markdown_table(["method", "median ms", "p90 ms", "GB/s", "% of memcpy peak", "agrees with index", "error"],
                       rows),
    ]
    return "\n".join(lines) + "\n"
