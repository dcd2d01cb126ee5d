"""The ``tbrun`` command: parse, build a config, call the library. Nothing else lives here."""

from __future__ import annotations

import typer

from . import bench_cmd, eval_cmd, generate_cmd, info_cmd, serve_cmd, train_cmd

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
# subcommands


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
