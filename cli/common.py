"""What every ``tbrun`` command shares: the consoles and the user-error boundary."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from offload_engine.errors import ConfigError, TbrunError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def user_errors(command: Callable) -> Callable:
    """Turn a ``TbrunError`` into one clear message and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TbrunError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(code=2) from None

    return wrapper


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt text from ``--prompt`` or ``--prompt-file`` (exactly one)."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both.")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise ConfigError(f"--prompt-file {prompt_file} does not exist.")
        return prompt_file.read_text(encoding="utf-8", errors="replace")
    if prompt is None:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompt-file FILE.")
    return prompt
