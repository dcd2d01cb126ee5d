"""A description of this machine, for ``tbrun info`` and for every report's header."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

import psutil
import torch


def cupy_status() -> str:
    """Whether a CUDA cupy is importable and can see a device."""
    if importlib.util.find_spec("cupy") is None:
        return "not installed (optional: pip install cupy-cuda13x)"
    try:
        import cupy

        return f"{cupy.__version__}, {cupy.cuda.runtime.getDeviceCount()} device(s)"
    except Exception as exc:  # installed but without a working CUDA runtime
        return f"installed but unusable: {type(exc).__name__}"


def triton_status() -> str:
    """Whether the Triton gather can be built here (version, C compiler, Python headers)."""
    from .cpu_cache.gather import triton_problem

    problem = triton_problem()
    if problem is not None:
        return f"no: {problem}"
    import triton

    where = "zero-copy gather available" if torch.cuda.is_available() else "CPU: interpreter and PTX checks only"
    return f"{triton.__version__}, C compiler and Python headers present ({where})"


def native_status() -> str:
    """The native CPU selection kernel: in use, or why not (offload_engine/native)."""
    from . import native

    return native.status()


def gather_method_status(device: torch.device | str | None = None) -> str:
    """The gather method a sparse-offload run uses here, and why."""
    from .cpu_cache.gather import choose_gather_method

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    method, reason = choose_gather_method(device)
    return f"{method}: {reason}"


def pinned_memory_status() -> str:
    """Whether page-locked host memory can be allocated here."""
    if not torch.cuda.is_available():
        return "no (no CUDA): the host KV store uses ordinary memory"
    from .cpu_cache.host_store import HostBuffer, HostRegistrar

    try:
        registrar = HostRegistrar()
        buffer = HostBuffer(2**20, registrar)
        pinned = buffer.bytes.is_pinned()
        buffer.close()
        return f"yes (cudaHostRegister through {registrar.via})" if pinned else "no: registered memory is not pinned"
    except Exception as exc:
        return f"no: {exc}"


REPORT_FOLDERS = ("bench/reports/", "bench/results/")  # written by runs; not the code that runs
REPO_ROOT = Path(__file__).resolve().parent.parent


def portable_path(path: str | Path) -> str:
    """A path as a report or checkpoint records it, never naming this machine's folders: inside the
    repository relative to it, any other absolute path by its last part, a relative one as given."""
    given = Path(path)
    try:
        return given.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return given.name if given.is_absolute() else str(path)


def portable_word(word: str) -> str:
    """A command-line word as a recorded command shows it: ``portable_path`` for an absolute path, the
    same for the value of ``--option=/absolute/path``, any other word unchanged."""
    if word.startswith("--") and "=" in word:
        option, value = word.split("=", 1)
        return f"{option}={portable_word(value)}"
    return portable_path(word) if Path(word).is_absolute() else word


def git_commit(cwd: str | None = None) -> str:
    """The checked-out commit (with ``-dirty`` when tracked files other than reports changed), or ``unknown``.

    Reports that other runs are writing (an evaluation's progress file, a finished report not yet
    committed) do not change the code, so they do not make the commit dirty."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=cwd, check=True)
        changed = [line[3:].strip('"') for line in status.stdout.splitlines() if line.strip()]
        dirty = any(not path.startswith(REPORT_FOLDERS) for path in changed)
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def commit_at_start(cwd: str) -> str:
    """``git_commit(cwd)`` as it was the first time this process asked. Report writers ask when they
    are imported, so a report names the code that ran, not a commit made while it ran."""
    return git_commit(cwd)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, str]:
    """CPU, cores, RAM, GPU, CUDA, pinned memory, cupy, and library versions."""
    import transformers

    memory = psutil.virtual_memory()
    info = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu cores": str(os.cpu_count()),
        "cpu threads": cpu_threads_text(),
        "host RAM": f"{memory.total / 2**30:.1f} GiB ({memory.available / 2**30:.1f} GiB available)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else "not available",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        info["host->device copy"] = f"{measure_h2d_gbps():.1f} GB/s (pinned, 256 MiB)"
    info["pinned memory"] = pinned_memory_status()
    info["cupy"] = cupy_status()
    info["triton"] = triton_status()
    info["gather method"] = gather_method_status()
    info["cpu selection kernel"] = native_status()
    return info


def measure_h2d_gbps(size_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best host-to-device copy rate from pinned memory, in GB/s (CUDA only)."""
    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000.0)
    return size_bytes / best / 1e9


# ------------------------------------------------------------------------------- CPU threads
CPU_THREADS_ENV = "OMP_NUM_THREADS"


def choose_cpu_threads(requested: int | None = None, sample_seconds: float = 0.1) -> tuple[int, str]:
    """Torch's CPU threads for this run, and why: ``requested`` (``--threads``), else
    ``$OMP_NUM_THREADS``, else the usable cores less those other processes keep busy now.

    Torch's CPU kernels wait at a barrier for every thread of every parallel region: with one more
    thread than free cores, each region waits for a descheduled thread, and a decode step of the
    embedded model took 2 s instead of 60 ms beside one busy process on two cores (35x; measured
    2026-12-03). Busy cores: the CPU utilisation of the whole machine over ``sample_seconds``
    (this process idle), rounded to the nearest core.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: give at least 1 (or leave it out to choose from the free cores)")
        return requested, "--threads"
    from_env = _threads_from_env()
    if from_env is not None:
        return from_env, f"${CPU_THREADS_ENV}"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(psutil.cpu_percent(interval=sample_seconds) / 100 * (os.cpu_count() or usable))
    threads = max(1, usable - busy)
    return threads, f"auto: {usable} usable cores, {busy} busy with other processes"


def _threads_from_env() -> int | None:
    """``$OMP_NUM_THREADS`` as a thread count; None when it is unset or empty. Anything but a whole number
    >= 1 is a ValueError (it was ignored silently, so a typo chose the threads from the free cores)."""
    text = os.environ.get(CPU_THREADS_ENV, "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{CPU_THREADS_ENV}={text!r} is not a thread count: set it to a whole number >= 1 or "
                         "unset it (tbrun then uses the free cores; --threads N overrides it).")
    return int(text)


_THREADS_CHOSEN: list[str] = []  # why the threads were set, once apply_cpu_threads ran


def apply_cpu_threads(requested: int | None = None) -> int:
    """Set torch's CPU threads (``choose_cpu_threads``) and remember why, for ``describe_machine``."""
    threads, why = choose_cpu_threads(requested)
    torch.set_num_threads(threads)
    _THREADS_CHOSEN[:] = [why]
    return threads


def cpu_threads_text() -> str:
    """Torch's CPU threads now, and why when tbrun chose them."""
    why = f" ({_THREADS_CHOSEN[0]})" if _THREADS_CHOSEN else ""
    return f"{torch.get_num_threads()}{why}"
