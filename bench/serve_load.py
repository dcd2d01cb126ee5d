"""Load on ``tbrun serve``: latency percentiles for sequential and concurrent clients, prefix reuse
over a conversation, and the server's host memory before and after many requests; then prefix
reuse with offloaded sparse decode over a conversation about a long document.

Starts ``tbrun serve`` on a free port of 127.0.0.1 (or uses ``--url``), drives it with the
``openai`` client over streaming chat requests, and measures on the client side the time to the
first token (TTFT) and the time between tokens (ms per step); the server's own per-request
statistics (the ``tbrun`` field) are kept beside them. The memory phase sends ``--memory-requests``
requests and compares the server's resident set size (psutil) after them with the one after the
warm-up: it must stay within 5%. The sparse phase starts a second server (``--sparse-args``,
default TokenButler at a 10% budget), sends a ``--document-words`` document with a question and
follow-ups, then replays the last turn after an unrelated request has replaced the cache, so the
same prompt's TTFT is measured with and without reuse. Every request loop is bounded, and only
127.0.0.1 is contacted.

    nice -n 5 python -m tbrun_bench.serve_load --out bench/reports
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import torch

from .report import fmt, machine_header, markdown_header, markdown_table, percentile, provenance, write_json

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?",
             "Say hello in Spanish.", "What do bees make?", "Which planet is red?"]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Give one more example.", "Summarise that in one sentence."]
FLAT_LIMIT = 0.05  # the RSS after the memory phase may exceed the one before by at most 5%
SPARSE_ARGS = "--offload --policy tokenbutler --budget 10%"
DOC_SUBJECTS = ["the harbour", "the old mill", "the north bridge", "the library", "the market", "the observatory"]
DOC_EVENTS = ["was repaired", "was painted", "was inspected", "changed owners", "was flooded", "reopened"]
DOCUMENT_QUESTION = "According to the records, what happened to the library most recently?"
DOCUMENT_FOLLOW_UPS = ["And the harbour?", "Which place changed owners first?", "Summarise the records in one sentence."]


def start_server(context: str, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tbrun_cli.main", "serve", "--port", str(port), "--context", context,
               "--max-queue", "16", "--log-level", "warning", *extra]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # at most ~5 minutes for the model to load
        if process.poll() is not None:
            raise SystemExit(f"tbrun serve exited:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("tbrun serve did not start in time")


def server_pid(url: str, process: subprocess.Popen | None) -> int | None:
    if process is not None:
        return process.pid
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return conn.pid
    return None


def timed_chat(client, messages: list[dict], max_tokens: int) -> dict:
    """One streaming chat request: TTFT, gaps between tokens, the server's statistics."""
    start = time.perf_counter()
    arrivals, text, stats = [], [], {}
    stream = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            stats = (chunk.model_extra or {}).get("tbrun", {})
    gaps = [1000.0 * (b - a) for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft_ms": 1000.0 * (arrivals[0] - start) if arrivals else float("nan"), "gaps_ms": gaps,
            "text": "".join(text), "server": stats}


def summary(results: list[dict]) -> dict:
    ttft = [r["ttft_ms"] for r in results]
    gaps = [g for r in results for g in r["gaps_ms"]]
    server_steps = [r["server"].get("ms_per_step", float("nan")) for r in results]
    return {"requests": len(results),
            "ttft_ms": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)},
            "ms_per_step": {f"p{q}": percentile(gaps, q) for q in (50, 90, 99)},
            "server_ms_per_step_median": percentile(server_steps, 50)}


def sequential(client, count: int, max_tokens: int) -> dict:
    return summary([timed_chat(client, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens)
                    for i in range(count)])


def concurrent(client, clients: int, each: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def run(worker: int) -> None:
        for i in range(each):
            question = QUESTIONS[(worker + i) % len(QUESTIONS)]
            result = timed_chat(client, [{"role": "user", "content": question}], max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"clients": clients, **summary(results)}


def conversation(client, turns: int, max_tokens: int) -> list[dict]:
    """A chat that goes on: each turn sends the whole history; the server prefills only what is new."""
    messages, rows = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[0] if turn == 0 else FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
        result = timed_chat(client, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["text"]})
        server = result["server"]
        rows.append({"turn": turn + 1, "prompt_tokens": server.get("prompt_tokens"),
                     "prefill_tokens": server.get("prefill_tokens"),
                     "prefill_tokens_saved": server.get("prefill_tokens_saved"), "ttft_ms": result["ttft_ms"]})
    return rows


def document(words: int) -> str:
    """A deterministic log of events, about ``words`` words (roughly as many tokens), to ask about."""
    lines, year = [], 1800
    while sum(len(line.split()) for line in lines) < words:
        i = len(lines)
        year += 1 + (i * 7) % 3
        lines.append(f"In {year}, {DOC_SUBJECTS[i % len(DOC_SUBJECTS)]} {DOC_EVENTS[(i * 5) % len(DOC_EVENTS)]}.")
    return "Town records:\n" + "\n".join(lines)


def document_conversation(client, text: str, max_tokens: int) -> dict:
    """Turns over a long document, each sending the whole history; then the last turn again after an
    unrelated request replaced the cache (a full prefill of the same prompt)."""
    messages, rows = [], []
    for turn, question in enumerate([DOCUMENT_QUESTION, *DOCUMENT_FOLLOW_UPS]):
        messages.append({"role": "user", "content": f"{text}\n\n{question}" if turn == 0 else question})
        result = timed_chat(client, messages, max_tokens)
        rows.append(_turn_row(turn + 1, result))
        messages.append({"role": "assistant", "content": result["text"]})
    messages.pop()
    client.completions.create(model="default", prompt="Zebras", max_tokens=2, temperature=0)  # replaces the cache
    fresh = _turn_row(len(rows), timed_chat(client, messages, max_tokens))
    return {"turns": rows, "last_turn_fresh": fresh}


def _turn_row(turn: int, result: dict) -> dict:
    server = result["server"]
    return {"turn": turn, "prompt_tokens": server.get("prompt_tokens"), "prefill_tokens": server.get("prefill_tokens"),
            "prefill_tokens_saved": server.get("prefill_tokens_saved"), "ttft_ms": result["ttft_ms"],
            "prefill_seconds": server.get("prefill_seconds"), "server_ms_per_step": server.get("ms_per_step"),
            "h2d_bytes_per_step": server.get("h2d_bytes_per_step"), "notes": server.get("notes", [])}


def sparse_phase(args) -> dict:
    """The document conversation on a server started with ``--sparse-args``."""
    import openai

    extra = [*args.sparse_args.split(), *args.server_arg]
    process, url = start_server(args.sparse_context, extra,
                                Path(tempfile.gettempdir()) / "tbrun_serve_load.sparse.server.log")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())
        timed_chat(client, [{"role": "user", "content": "Hi"}], 2)  # warm-up, not counted
        started = time.perf_counter()
        conversation = document_conversation(client, document(args.document_words), args.max_tokens)
        return {"server": {**{k: health[k] for k in ("model", "mode", "policy", "context")},
                           "options": " ".join(extra)},
                "document_words": args.document_words, "max_tokens": args.max_tokens,
                "seconds": time.perf_counter() - started, **conversation}
    finally:
        process.send_signal(2)
        process.wait(timeout=120)


def memory(client, pid: int, warmup: int, count: int, max_tokens: int) -> dict:
    process = psutil.Process(pid)
    for i in range(warmup):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTIONS[i % 6]}],
                                       temperature=0, max_tokens=max_tokens)
    before = process.memory_info().rss
    for i in range(count):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTIONS[i % 6]}],
                                       temperature=0, max_tokens=max_tokens)
    after = process.memory_info().rss
    growth = (after - before) / before
    return {"warmup_requests": warmup, "requests": count, "rss_before_bytes": before, "rss_after_bytes": after,
            "growth": growth, "flat_within_5_percent": growth <= FLAT_LIMIT}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running tbrun serve (default: start one on a free port)")
    parser.add_argument("--context", default="2048", help="--context of the started server")
    parser.add_argument("--server-arg", action="append", default=[], help="more options for the started server")
    parser.add_argument("--sequential", type=int, default=12, help="requests one after another")
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients")
    parser.add_argument("--each", type=int, default=4, help="requests per concurrent client")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per latency request")
    parser.add_argument("--turns", type=int, default=4, help="turns of the conversation")
    parser.add_argument("--memory-requests", type=int, default=200)
    parser.add_argument("--memory-max-tokens", type=int, default=4)
    parser.add_argument("--sparse-args", default=SPARSE_ARGS, help="options of the sparse phase's server ('' skips it)")
    parser.add_argument("--sparse-context", default="4096", help="--context of the sparse phase's server")
    parser.add_argument("--document-words", type=int, default=1500, help="words of the sparse phase's document")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args(argv)

    import openai

    args.out.mkdir(parents=True, exist_ok=True)
    process, url = (None, args.url.rstrip("/")) if args.url else start_server(
        args.context, args.server_arg, Path(tempfile.gettempdir()) / "tbrun_serve_load.server.log")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())
        timed_chat(client, [{"role": "user", "content": "Hi"}], 2)  # warm-up, not counted
        report = {"benchmark": "serve_load", "provenance": provenance("python -m tbrun_bench.serve_load"),
                  "machine": machine_header(torch.device("cpu")),
                  "server": {**{k: health[k] for k in ("model", "mode", "policy", "context", "max_queue")},
                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")},
                  "settings": {k: getattr(args, k) for k in ("sequential", "clients", "each", "max_tokens", "turns",
                                                            "memory_requests", "memory_max_tokens")},
                  "sequential": sequential(client, args.sequential, args.max_tokens),
                  "concurrent": concurrent(client, args.clients, args.each, args.max_tokens),
                  "conversation": conversation(client, args.turns, args.max_tokens),
                  "memory": memory(client, server_pid(url, process), 10, args.memory_requests,
                                   args.memory_max_tokens)}
    finally:
        if process is not None:
            process.send_signal(2)  # Ctrl-C: the server's clean shutdown
            process.wait(timeout=120)
    if args.sparse_args.strip() and not args.url:
        report["sparse_reuse"] = sparse_phase(args)
    write_json(args.out / "serve_load.json", report)
    (args.out / "serve_load.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    rows = []
    for name, data in (("sequential", report["sequential"]), ("concurrent", report["concurrent"])):
        label = name if name == "sequential" else f"concurrent ({data['clients']} clients)"
        rows.append([label, data["requests"], *(fmt(data["ttft_ms"][q]) for q in ("p50", "p90", "p99")),
                     *(fmt(data["ms_per_step"][q]) for q in ("p50", "p90", "p99")),
                     fmt(data["server_ms_per_step_median"])])
    mem = report["memory"]
    turns = [[r["turn"], r["prompt_tokens"], r["prefill_tokens"], r["prefill_tokens_saved"], fmt(r["ttft_ms"])]
             for r in report["conversation"]]
    server = report["server"]
    return "\n".join([
        markdown_header("tbrun serve under load", report), "",
        f"Server: {server['model']}, {server['mode']} / {server['policy']}, context {server['context']}, "
        f"queue {server['max_queue']}, OMP_NUM_THREADS={server['OMP_NUM_THREADS']}. Streaming chat requests, "
        f"greedy, `ignore_eos`, {report['settings']['max_tokens']} tokens each; times measured by the client "
        "(TTFT includes the queue wait for concurrent clients); the last column is the server's own median "
        "step time. The machine is shared: compare the load average above with the step times.", "",
        markdown_table(["clients", "requests", "TTFT p50 ms", "p90", "p99", "ms/step p50", "p90", "p99",
                        "server ms/step"], rows), "",
        "## Prefix reuse over a conversation", "",
        "Each turn sends the whole history; only the tokens after the cached prefix are prefilled.", "",
        markdown_table(["turn", "prompt tokens", "prefilled", "saved", "TTFT ms"], turns), "",
        "## Host memory of the server", "",
        f"RSS after {mem['warmup_requests']} warm-up requests: {mem['rss_before_bytes'] / 2**20:.1f} MiB; after "
        f"{mem['requests']} more: {mem['rss_after_bytes'] / 2**20:.1f} MiB ({100 * mem['growth']:+.2f}%, "
        f"{'flat' if mem['flat_within_5_percent'] else 'NOT flat'} within 5%).", "",
        *(sparse_markdown(report["sparse_reuse"]) if "sparse_reuse" in report else []),
    ])


def sparse_markdown(sparse: dict) -> list[str]:
    server = sparse["server"]
    rows = [[r["turn"], r["prompt_tokens"], r["prefill_tokens"], r["prefill_tokens_saved"], fmt(r["ttft_ms"]),
             fmt(r["server_ms_per_step"]), fmt((r["h2d_bytes_per_step"] or 0) / 1024)]
            for r in sparse["turns"]]
    fresh = sparse["last_turn_fresh"]
    rows.append([f"{fresh['turn']} again, cache replaced", fresh["prompt_tokens"], fresh["prefill_tokens"],
                 fresh["prefill_tokens_saved"], fmt(fresh["ttft_ms"]), fmt(fresh["server_ms_per_step"]),
                 fmt((fresh["h2d_bytes_per_step"] or 0) / 1024)])
    return [
        "## Prefix reuse with offloaded sparse decode", "",
        f"A second server: {server['model']}, {server['mode']} / {server['policy']}, context {server['context']} "
        f"(`{server['options']}`). A conversation about a {sparse['document_words']}-word document, "
        f"{sparse['max_tokens']} tokens per answer, each turn sending the whole history. An answer decoded while "
        "layers selected tokens is prefilled again with the next message (its KV came from sparse attention), "
        "so every turn answers as a fresh prefill would. The last row sends the last turn again after an "
        f"unrelated request replaced the cache: the same prompt without reuse. Phase time: {sparse['seconds']:.0f} s.",
        "",
        markdown_table(["turn", "prompt tokens", "prefilled", "saved", "TTFT ms", "server ms/step",
                        "KiB moved/step"], rows), "",
    ]


if __name__ == "__main__":
    main()
