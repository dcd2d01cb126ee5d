"""The ``tbrun`` command: parse, build a config, call the library. Nothing else lives here."""

from __future__ import annotations

from typing import Optional

import typer

from . import bench_cmd, eval_cmd, generate_cmd, info_cmd, serve_cmd, train_cmd
from .common import request_cpu_threads

app = typer.Typer(
    name="tbrun",
    help="Long-context LLM inference with the KV cache in host memory and learned token selection.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

generate_cmd.register(app)
info_cmd.register(app)
bench_cmd.register(app)
train_cmd.register(app)
eval_cmd.register(app)
serve_cmd.register(app)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"tbrun {version('tbrun')}")
        raise typer.Exit()


@app.callback()
def configure(
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Torch CPU threads (before the command: tbrun --threads 2 generate ...). Default: "
        "$OMP_NUM_THREADS, else the usable cores less those other processes keep busy (one thread more than the "
        "free cores makes every CPU kernel wait for a descheduled thread). tbrun's native selection kernels run on "
        "one thread whatever this is; TBRUN_NATIVE_THREADS=N splits their rows among N."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print tbrun's version and exit."),
) -> None:
    """Long-context LLM inference with the KV cache in host memory and learned token selection."""
    request_cpu_threads(threads)  # applied as the command starts (common.user_errors), after its options are
    # parsed: a command's --help, or an option it refuses, answers without loading torch


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
