"""``tbrun serve``: the engine behind an OpenAI-compatible HTTP API (see offload_engine/server)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from offload_engine.errors import ConfigError

from .common import err_console, user_errors
from .generate_cmd import (
    ALLOW_ROPE_SCALING, BUDGET, CONTEXT, COPY_THREAD, DEVICE, DTYPE, INTERVAL, KEEP_BONUS, KEY_DTYPE, MODEL,
    NEIGHBOR_RULE, NEIGHBORS, OFFLOAD, PAGE_PREFILTER, POLICY, PREDICTOR, REFRESH_LAYERS, SINKS, WINDOW, EngineOptions,
    build_engine,
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # what uvicorn takes
GRACEFUL_SHUTDOWN_SECONDS = 5  # how long uvicorn waits for the answers in flight at Ctrl-C before dropping them
STARTUP_FAILURE = 3  # uvicorn's exit code when the server did not start (it logs why)


def register(app: typer.Typer) -> None:
    app.command("serve")(user_errors(serve))


def serve(
    model: Optional[str] = MODEL,
    context: Optional[str] = CONTEXT,
    offload: bool = OFFLOAD,
    policy: str = POLICY,
    budget: Optional[str] = BUDGET,
    sinks: int = SINKS,
    window: int = WINDOW,
    interval: int = INTERVAL,
    refresh_layers: str = REFRESH_LAYERS,
    neighbors: int = NEIGHBORS,
    neighbor_rule: str = NEIGHBOR_RULE,
    predictor: Optional[Path] = PREDICTOR,
    key_dtype: str = KEY_DTYPE,
    page_prefilter: int = PAGE_PREFILTER,
    keep_bonus: float = KEEP_BONUS,
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = DTYPE,
    allow_rope_scaling: bool = ALLOW_ROPE_SCALING,
    copy_thread: bool = COPY_THREAD,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    max_queue: int = typer.Option(8, "--max-queue",
                                  help="Requests that may wait behind the running one; more get HTTP 429."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: warning, info, debug."),
) -> None:
    """Serve the model over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    One request decodes at a time; a chat that goes on prefills only its new tokens (prefix reuse;
    not with h2o, snapkv or sliding-window models). Ctrl-C stops the server (requests still running or
    waiting get HTTP 503: retry elsewhere) and frees the KV cache.
    """
    from offload_engine.server import ServeConfig, create_app

    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}.")
    config = ServeConfig(model_name=served_name(model), max_queue=max_queue)
    check_port_free(host, port)
    engine = build_engine(EngineOptions(model, context, offload, policy, budget, sinks, window, interval, neighbors,
                                        neighbor_rule, predictor, device, dtype, allow_rope_scaling, refresh_layers,
                                        copy_thread, key_dtype, page_prefilter, keep_bonus))
    app = create_app(engine, config)
    err_console.print(f"serving [bold]{escape(config.model_name)}[/] (also as 'default'), {engine.config.mode.value}, "
                      f"context {engine.config.context} on http://{host}:{port}/v1 — Ctrl-C to stop")
    server = uvicorn_server(app, host, port, log_level.lower())
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has shut down
        pass
    if not server.started:
        raise typer.Exit(code=STARTUP_FAILURE)
    err_console.print("stopped: the KV cache is freed")


def uvicorn_server(app, host: str, port: int, log_level: str):
    """uvicorn's server for ``app`` (``create_app``), whose shutdown first cuts the running and waiting
    generations (``begin_shutdown``): their clients, still connected, get a 503 or an error chunk saying the
    server is going down. uvicorn alone would wait up to ``GRACEFUL_SHUTDOWN_SECONDS`` for them, drop their
    connections unanswered and only then run the app's shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.worker.begin_shutdown()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))


def served_name(model: Optional[str]) -> str:
    """The name the model answers to besides ``default``: the embedded model's, the hub id, or the folder's."""
    from offload_engine.models import EMBEDDED_MODEL_NAME

    if model is None or model in ("", "default", "embedded"):
        return EMBEDDED_MODEL_NAME
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that is taken before spending time loading the model."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535).")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:  # the host, not the port
                problem = "does not resolve" if isinstance(exc, socket.gaierror) else "is not an address of this machine"
                raise ConfigError(f"cannot listen on {host}:{port}: --host {host!r} {problem} ({exc.strerror}); "
                                  "use 127.0.0.1, 0.0.0.0 or one of this machine's own addresses.") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port.") from None
