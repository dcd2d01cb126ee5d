"""What every ``tbrun`` command shares: the consoles and the user-error boundary."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from offload_engine.errors import ConfigError, TbrunError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def user_errors(command: Callable) -> Callable:
    """Every command's boundary: apply ``--threads`` as it starts (``configure_cpu``), and turn a ``TbrunError``
    into one clear message and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            configure_cpu()
            return command(*args, **kwargs)
        except TbrunError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")  # user text: no markup
            raise typer.Exit(code=2) from None

    return wrapper


_REQUESTED_THREADS: list[int | None] = [None]


def request_cpu_threads(threads: int | None) -> None:
    """Remember ``tbrun --threads`` (the root command's callback runs before the command's options are parsed)."""
    _REQUESTED_THREADS[0] = threads


def configure_cpu() -> None:
    """Apply the requested ``--threads`` and check ``$TBRUN_NATIVE_THREADS`` as a command starts, before it
    allocates anything (not in the root callback: a command's --help then loads no torch)."""
    from offload_engine import native
    from offload_engine.machine import apply_cpu_threads

    try:
        apply_cpu_threads(_REQUESTED_THREADS[0])
        native.kernel_threads()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, a file to write that is a folder or whose folder does not exist."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give a file name, e.g. {path / 'stats.json'}.")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {path.parent} does not exist; create it or choose another path.")


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt text from ``--prompt`` or ``--prompt-file`` (exactly one)."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both.")
    if prompt_file is not None:
        if prompt_file.is_dir():
            raise ConfigError(f"--prompt-file {prompt_file} is a folder: give a text file.")
        if not prompt_file.exists():
            raise ConfigError(f"--prompt-file {prompt_file} does not exist.")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--prompt-file {prompt_file} is not UTF-8 text (byte {exc.start}): give a text "
                              "file.") from None
        except OSError as exc:
            raise ConfigError(f"--prompt-file {prompt_file} cannot be read ({exc.strerror or exc}).") from None
    if prompt is None:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompt-file FILE.")
    if not prompt.strip():
        raise ConfigError("the prompt is empty: pass some text with --prompt or --prompt-file.")
    return prompt
