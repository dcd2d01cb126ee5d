"""Native CPU kernels of token selection, built with the machine's C++ compiler at first use.

On the CPU a producer's scoring in torch is a batched matmul, a softmax and a mean: three passes over
``[Lg, KvH, g, m]`` numbers; its top-k a numpy partition per row; its residency update about 40 numpy
operations. ``selection.cpp`` scores in one pass over the compact keys (bench/reports/selection_cpu.md
against torch), finds each row's top-k by counting, updates the residency map in one call, and copies
a layer's fetch plan (K and V) in one call.

The library is compiled once per source, compiler and CPU into ``$TBRUN_NATIVE_CACHE`` (default
``~/.cache/tbrun/native``) with ``-O3 -march=native``; the build writes a temporary file and renames
it, so two processes never load a half-written library. Where there is no compiler, or the build
fails, or ``TBRUN_NATIVE=0``, ``kernels()`` returns None and callers keep their torch path; why is in
``status()`` (``tbrun info`` prints it). GPUs never come here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from ..selection.pages import PageRows
    from ..selection.ranking import HeldTerms

import numpy as np
import torch

SOURCE = Path(__file__).with_name("selection.cpp")
# The wrappers below and the library must agree on every signature: the library says which version of
# them it was built from (tbrun_kernels_abi), and one of another version is not used. The source is
# read when this module is imported, so an edit of selection.cpp under a running process cannot build
# a library the loaded wrappers do not match.
ABI = 30
_SOURCE_TEXT: str | None = None
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC",
         "-pthread")
_ENV_SWITCH = "TBRUN_NATIVE"
ATTENTION_MAX_GROUP, ATTENTION_MAX_DIM = 16, 256  # tbrun_decode_attention's limits (selection.cpp)
# The one-token kernels of the rest of a step (norms, RoPE) take at most this many values: a decode token's
# hidden state or its heads; a prefill's chunk runs as torch's vectorised operations.
TOKEN_MAX_ENTRIES = 1 << 15
ACTIVATIONS = ("silu", "gelu_tanh")  # tbrun_gated_mlp's act codes 0 and 1
WEIGHT_FORMATS = ("float32", "q4_1", "q8_0")  # tbrun_linear's format codes 0, 1, 2
WEIGHT_BLOCK = 32  # weights a q4_1 / q8_0 block holds, along a row
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}

_lock = threading.Lock()
_scratch_buffers = threading.local()  # SelectionKernels._scratch
_loaded: "SelectionKernels | None" = None
_status = "not built yet"
_tried = False


def _source() -> str:
    """The kernels' source as it was when this module was first asked for it (see ``ABI``)."""
    global _SOURCE_TEXT
    if _SOURCE_TEXT is None:
        _SOURCE_TEXT = SOURCE.read_text()
    return _SOURCE_TEXT


def cache_dir() -> Path:
    """Where built libraries are kept: ``$TBRUN_NATIVE_CACHE`` or ``~/.cache/tbrun/native``."""
    return Path(os.environ.get("TBRUN_NATIVE_CACHE") or Path.home() / ".cache" / "tbrun" / "native")


# os.environ's own mapping of encoded names to encoded values, where the interpreter keeps one (CPython
# does): the kernels' wrappers ask for the two variables below about 500 times a decode step, and
# os.environ.get (encode the name, look up, decode the value) took ~0.8 µs a time, 0.4 ms a step; a look-up
# in the mapping itself ~30 ns. Values set through os.environ (tests switch the kernels live) land there too.
THREADS_VARIABLE = "TBRUN_NATIVE_THREADS"
_encoded: dict[str, object] = {}  # variable -> its name as os.environ keeps it
_parsed: dict[str, tuple[object, object]] = {}  # variable -> (its raw value when parsed, what it parsed to)


def _parsed_variable(name: str, parse):
    """``parse(os.environ.get(name))``, parsed again only when the variable's value changed. The mapping is
    looked up at every call, so an ``os.environ`` replaced since import (a test's patch) is the one read."""
    environ = os.environ
    raw_environment = getattr(environ, "_data", None)
    if raw_environment is None or not hasattr(environ, "encodekey") or not hasattr(environ, "decodevalue"):
        return parse(environ.get(name))
    key = _encoded.get(name)
    if key is None:
        key = _encoded[name] = environ.encodekey(name)
    raw = raw_environment.get(key)
    held = _parsed.get(name)
    if held is not None and held[0] == raw:
        return held[1]
    value = parse(None if raw is None else environ.decodevalue(raw))
    _parsed[name] = (raw, value)
    return value


def _switch_on(text: str | None) -> bool:
    return (text or "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """False when ``TBRUN_NATIVE=0`` (the torch path everywhere)."""
    return _parsed_variable(_ENV_SWITCH, _switch_on)


# per Python thread: the kernels' threads in its decode (decode_threads), where $TBRUN_NATIVE_THREADS is unset; a
# copy thread's selections and copies, and another thread's decode, keep their own
_DECODE = threading.local()


def kernel_threads() -> int:
    """How many threads a kernel may split its rows (or a large plan) among: ``$TBRUN_NATIVE_THREADS`` where
    set, else 1, and on a thread inside ``decode_threads`` the cores torch had. The kernels give the same results
    at any count (tests/test_native.py)."""
    threads = _requested_threads()
    return getattr(_DECODE, "threads", 1) if threads is None else threads


def _requested_threads() -> int | None:
    """``$TBRUN_NATIVE_THREADS`` as a count, None where unset; ValueError saying what is wrong with it."""
    threads = _parsed_variable(THREADS_VARIABLE, _thread_count)
    if isinstance(threads, str):  # what was wrong, kept as parsed, refused at every call
        raise ValueError(threads)
    return threads


@contextmanager
def decode_threads() -> Iterator[None]:
    """A CPU decode on the cores torch was given: the native kernels split their work among them, torch runs
    on one thread meanwhile; both are restored on exit.

    A decode step on the CPU is native calls (every projection, the norms, MLP and attention of a Llama-form
    layer, the selection) with a few small torch operations between them. Torch's OpenMP workers spin on the
    other cores for a while after each of its parallel regions, so a kernel's worker thread beside them
    waits for a core (with torch on 2 threads a producer's native top-k took 1 ms instead of 57 µs, and
    tokenbutler's selection 41 ms a step instead of 17.5 at 7.5k on the embedded model, 2026-12-04, when
    a step was hundreds of torch operations). With torch on one thread and the kernels on torch's cores a
    step of the embedded model took 0.71-0.79x the time of torch's two threads and one kernel thread, at every
    mode and at 12 and 7,500 tokens (bench/reports/decode_threads.md). A copy thread (``--copy-thread``) takes
    a core that ``--threads`` left free, so it is not among them (its kernel calls run on one thread). Where
    ``$TBRUN_NATIVE_THREADS`` is set it decides the kernels' threads and torch keeps its own
    (``TBRUN_NATIVE_THREADS=1``: the behaviour before); without the kernels, or inside another
    ``decode_threads`` of the same thread, nothing changes.
    """
    if (_requested_threads() is not None or hasattr(_DECODE, "threads") or not enabled()
            or kernels() is None):
        yield
        return
    torch_threads = torch.get_num_threads()
    try:
        _DECODE.threads = torch_threads
        if torch_threads > 1:
            torch.set_num_threads(1)
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        vars(_DECODE).pop("threads", None)


def decode_kernel_threads() -> int:
    """The kernels' threads in a ``decode_threads`` started now on this thread: ``$TBRUN_NATIVE_THREADS`` where
    set, else those of the decode it is in, else torch's count."""
    requested = _requested_threads()
    return requested if requested is not None else getattr(_DECODE, "threads", None) or torch.get_num_threads()


def _thread_count(text: str | None) -> int | None | str:
    """The count ``$TBRUN_NATIVE_THREADS`` asks for, None where it is unset or empty, or what is wrong with it."""
    text = (text or "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        return (f"{THREADS_VARIABLE}={text!r}: write a whole number of threads, 1 or more, or unset it (a decode "
                "then splits the kernels' work among the cores torch was given)")
    return int(text)


def status() -> str:
    """One line: whether the native kernels are in use, and if not, why."""
    if not enabled():
        return f"off ({_ENV_SWITCH}=0): torch kernels"
    if kernels() is None:
        return _status
    try:
        requested = _requested_threads()
        threads = (f"{requested} kernel thread(s) (${THREADS_VARIABLE})" if requested is not None else
                   f"{decode_kernel_threads()} kernel thread(s) in a decode (torch's threads; torch on 1 meanwhile)")
    except ValueError as error:
        threads = str(error)
    return f"{_status}; {threads}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(wanted))
    except OSError:
        return platform.processor() or platform.machine()


def _library_path(compiler: str, source: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, errors="replace",
                             timeout=30).stdout
    key = hashlib.sha256("\0".join([source, " ".join(FLAGS), version, _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / f"tbrun_selection_{key}.so"


def _build(compiler: str, source: str, target: Path) -> None:
    """Compile ``source`` (the text the library's name was hashed from, on stdin) into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix="tmp-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, "-x", "c++", "-", "-o", scratch], input=source,
                              capture_output=True, text=True, errors="replace", timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(scratch, 0o755 & ~umask)  # mkstemp made it 0600: readable by whoever shares the cache
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def kernels() -> "SelectionKernels | None":
    """The loaded kernels, building them on first use; None where they cannot be had (see ``status``)."""
    global _loaded, _status, _tried
    if not enabled():
        return None
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler (g++, c++ or clang++, or $CXX) on PATH")
            source = _source()
            path = _library_path(compiler, source)
            if not path.exists():
                _build(compiler, source, path)
            library = ctypes.CDLL(str(path))
            abi = library.tbrun_kernels_abi()
            if abi != ABI:
                raise RuntimeError(f"{path.name} implements kernel ABI {abi}, these wrappers ABI {ABI}")
            _loaded = SelectionKernels(library)
            forms = [text for on, text in ((_loaded.bf16_pair_products, "bfloat16 scores by AVX512-BF16 pair products"),
                                           (_loaded.int8_quad_products, "int8 scores by AVX512-VNNI quad products"))
                     if on]
            _status = f"on: {path.name} ({', '.join([Path(compiler).name + ' -march=native'] + forms)})"
        except Exception as exc:  # whatever went wrong, the torch path runs and status() says why
            _loaded, _status = None, f"unavailable, torch kernels instead: {type(exc).__name__}: {exc}"
        _tried = True
    return _loaded


def reset() -> None:
    """Forget the loaded library (tests that switch ``TBRUN_NATIVE`` or the cache directory)."""
    global _loaded, _status, _tried, _SOURCE_TEXT
    with _lock:
        _loaded, _status, _tried, _SOURCE_TEXT = None, "not built yet", False, None


def _address(array: np.ndarray) -> int:
    """The address of a numpy array's first element, for a ``c_void_p`` argument (``ctypes.data_as``
    costs ~3 µs a call, several per kernel call)."""
    return array.__array_interface__["data"][0]


@dataclass(frozen=True)
class SelectionKernels:
    """Typed wrappers of the library's kernels; shapes, strides and ranges are checked here."""

    library: ctypes.CDLL

    def __post_init__(self) -> None:
        # pointers as c_void_p: plain integer addresses (tensor.data_ptr(), _address) pass without conversion
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        # select_rows' page bounds, their row and dim strides, page size, pages kept, blocks and their row stride,
        # block scales and their row stride
        pages = (ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64)  # and int8 bounds with scales
        f32 = ctypes.c_float  # select_rows' held terms: a held position's score times the first, plus the second
        # (and last, the address of a Reweight or None)
        signatures = {
            "tbrun_group_scores": [i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64],
            "tbrun_group_scores_bf16": [i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64],
            "tbrun_residency_update": [ptr, i64, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64],
            "tbrun_gather_pairs": [i64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), i64, i64,
                                   ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64],
            "tbrun_topk_rows": [ptr, i64, i64, i64, i64, ptr, ptr, i64],
            "tbrun_query_mlp": [ptr, i64, ptr, ptr, ctypes.c_float, ptr, i64, ptr, i64, ptr, ptr],
            "tbrun_linear": [ptr, i64, ptr, i64, i64, ptr, ptr, i64],
            "tbrun_rms_norm": [ptr, ptr, ptr, i64, i64, ptr, ctypes.c_float, ctypes.c_float, ptr],
            "tbrun_rope": [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr],
            "tbrun_gated_mlp": [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64],
            "tbrun_write_token": [ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64],
            "tbrun_decode_layer_input": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr],
            "tbrun_decode_layer_output": [ptr, ptr, ptr, ptr, ptr],
            "tbrun_value_norms": [ptr, i64, i64, i64, i64, i64, ptr, i64, i64, ptr, i64],
            "tbrun_decode_attention": [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, ptr, i64,
                                       ctypes.c_float, ptr, ptr, i64],
            "tbrun_project_token": [ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64],
            "tbrun_select_rows": [i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, i64,
                                  ptr, i64, i64, ptr, ptr, ptr, i64, *pages, ptr, ptr, ptr, f32, f32, ptr],
            "tbrun_select_rows_bf16": [i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, i64, i64, ptr, i64, ptr, i64,
                                       i64, ptr, i64, i64, ptr, ptr, ptr, i64, *pages, ptr, ptr, ptr, f32, f32, ptr],
            "tbrun_group_scores_int8": [i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64],
            "tbrun_select_rows_int8": [i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, ptr, i64,
                                       ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64, *pages, ptr, ptr, ptr, f32, f32,
                                       ptr],
        }
        for name, argtypes in signatures.items():
            kernel = getattr(self.library, name)
            kernel.argtypes, kernel.restype = argtypes, ctypes.c_int

    @property
    def int8_quad_products(self) -> bool:
        """Whether int8 keys are scored against the query quantised to int8 (``predictor.network.quantize_query``;
        the CPU has AVX512-VNNI: exact integer products of 4 byte pairs summed in 32 bits), rather than against
        the float32 query with the codes widened."""
        return bool(self.library.tbrun_int8_quad_products())

    @property
    def bf16_pair_products(self) -> bool:
        """Whether bfloat16 keys are scored against the query rounded to bfloat16 (the CPU has AVX512-BF16:
        exact products of bfloat16 pairs summed in float32), rather than widened against the float32 query."""
        return bool(self.library.tbrun_bf16_pair_products())

    def _scratch(self, size: int) -> np.ndarray:
        """A float32 work buffer of at least ``size`` floats, kept per thread and grown as the sequence
        grows, so that a decode step allocates none (the kernel overwrites what it reads)."""
        held = getattr(_scratch_buffers, "buffer", None)
        if held is None or held.size < size:
            held = _scratch_buffers.buffer = np.empty(max(size, 2 * (held.size if held is not None else 0)),
                                                      dtype=np.float32)
        return held

    def group_scores(self, queries: torch.Tensor, keys: torch.Tensor, reduction: str = "mean",
                     scales: torch.Tensor | None = None) -> torch.Tensor:
        """In one pass over the keys, ``softmax(queries @ keys, -1).mean(-2)`` (``reduction`` "mean") or
        ``(queries @ keys).amax(-2)`` ("max"; for g = 1 the logits, no exponentials): queries ``[R, g, d]``
        float32, keys ``[R, d, m]`` float32, bfloat16 or int8 (CPU; tokens contiguous, rows and dims at any
        uniform strides) -> ``[R, m]`` float32. bfloat16 keys: the scores of ``keys.float()`` from half the bytes;
        where ``bf16_pair_products`` (AVX512-BF16, d even) with the query rounded to bfloat16 as well, as a
        GPU's bfloat16 matmul takes it. int8 keys: codes, with ``scales`` ``[R, >= m]`` float16 (tokens
        contiguous), each token's logits the codes' times its scale; where ``int8_quad_products`` (AVX512-VNNI,
        d a multiple of 4) against the query quantised to int8 per head (``predictor.network.quantize_query``)."""
        reduce = _reduce_code(reduction)
        rows, g, d = queries.shape
        _check_scoring(queries, keys, scales)
        m = keys.shape[2]
        q = np.ascontiguousarray(queries.detach().numpy())
        out = np.empty((rows, m), dtype=np.float32)
        if m == 0 or rows == 0:
            return torch.from_numpy(out)
        threads = max(1, min(kernel_threads(), rows))
        buffer = self._scratch(threads * g * m)
        # keys: the numpy view of the tensor's own memory (no copy), read through its strides
        base = keys.detach()
        if keys.dtype == torch.int8:
            self.library.tbrun_group_scores_int8(reduce, _address(q), rows, g, d, base.data_ptr(), base.stride(0),
                                                 base.stride(1), m, scales.data_ptr(), scales.stride(0), _address(out),
                                                 _address(buffer), threads)
            return torch.from_numpy(out)
        kernel = (self.library.tbrun_group_scores if keys.dtype == torch.float32
                  else self.library.tbrun_group_scores_bf16)
        kernel(reduce, _address(q), rows, g, d, base.data_ptr(), base.stride(0), base.stride(1), m, _address(out),
               _address(buffer), threads)
        return torch.from_numpy(out)

    def select_rows(self, queries: torch.Tensor, keys: torch.Tensor, lo: int, hi: int, keep: int,
                    slot_pos: np.ndarray, slot_of: np.ndarray, active: np.ndarray, reduction: str = "mean",
                    scales: torch.Tensor | None = None, pages: "PageRows | None" = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A producer's selection in one call: per row, ``group_scores`` under ``reduction`` (the mean over
        the ``m`` tokens, the max over the candidates), the top ``keep`` of candidates ``[lo, hi)``
        (``topk_rows``; candidate ``j`` is position ``lo + j``) and ``residency_update`` with them. queries
        ``[R, g, d]`` float32, keys ``[R, d, m]`` (and int8 keys' ``scales``) as for ``group_scores``; the map's tables as for
        ``residency_update`` (written in place). Needs
        ``0 < keep <= hi - lo``, ``0 <= lo``, ``hi <= m``, ``keep <= n`` and ``hi`` within the map's
        capacity. ``pages``: the rows' page bounds and the prefilter's setting (``selection/pages.py``), applied
        where ``PagePrefilter.kept_pages`` says. -> (positions, slots ``[R, width]``, counts ``[R]``) as
        ``residency_update`` returns them. Not for every step: ``bind_select_rows`` checks the keys and tables
        once (``ResidencyMap.bind_select``)."""
        _check_scoring(queries, keys, scales)  # against the keys (the binding then checks them on their own)
        bound = self.bind_select_rows(keys, slot_pos, slot_of, active, reduction, scales, pages)
        return bound(queries.detach().contiguous(), keys.shape[2], lo, hi, keep)

    def bind_select_rows(self, keys: torch.Tensor, slot_pos: np.ndarray, slot_of: np.ndarray, active: np.ndarray,
                         reduction: str = "mean", scales: torch.Tensor | None = None,
                         pages: "PageRows | None" = None, copies: "RowCopies | None" = None,
                         network: "QueryNetwork | None" = None, reweight: "Reweight | None" = None
                         ) -> "BoundSelectRows":
        """``select_rows`` of these keys ``[R, d, capacity]`` (any number of their first tokens at each call) and
        tables (and page bounds), checked now: the call left to make at each step passes only the queries and
        the ranges. ``copies`` (``bind_row_copies``, one per row): each call also copies the rows it places.
        ``network`` (``QueryNetwork``): a call may pass the producer's input ``x`` instead of queries, and the
        kernel runs the query network first. ``reweight`` (``Reweight``): the rows select by critical(...)'s two
        stages over the scores."""
        return BoundSelectRows(self, keys, slot_pos, slot_of, active, reduction, scales, pages, copies, network,
                               reweight)

    def bind_row_copies(self, rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
                        ) -> "RowCopies | None":
        """The copies a bound selection makes as it places its rows (``RowCopies``): per selection row, (host
        keys ``[tokens, D]``, host values, key slots ``[slots, D]``, value slots), every source at one row stride
        and count, every target at one, rows of D contiguous elements of one dtype, on the CPU; None where they
        are not (then the caller gathers after the selection, as before)."""
        return RowCopies.bind(rows)

    def query_mlp(self, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float,
                  w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """``w2 @ silu(w1 @ layer_norm(x))`` for one token, float32: x ``[E]``, norm weight and bias ``[E]``
        (bias may be None), w1 ``[I, E]``, w2 ``[O, I]`` (CPU, contiguous) -> ``[O]``. The predictor's query
        network (``predictor.network.query_mlp``) at a decode step, where torch's matrix-vector products with
        weights out of the caches took 5-8x as long. ``bind_query_mlp`` checks the weights once."""
        return self.bind_query_mlp(norm_weight, norm_bias, eps, w1, w2)(x)

    def bind_query_mlp(self, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float,
                       w1: torch.Tensor, w2: torch.Tensor) -> "BoundQueryMLP":
        """``query_mlp`` with these weights, checked now (they must not be resized while bound)."""
        return BoundQueryMLP(self, norm_weight, norm_bias, eps, w1, w2)

    def bind_key_writer(self, projections: torch.Tensor, keys: torch.Tensor,
                        scales: torch.Tensor | None = None) -> "BoundKeyWriter | None":
        """A decode token's keys through each layer's compact projection into a compact cache (int8 codes with
        their ``scales``, or float keys), bound to these tensors: ``BoundKeyWriter``, or None where the kernel
        does not write them (see there)."""
        return BoundKeyWriter.bind(self, projections, keys, scales)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``torch.nn.functional.linear`` for one token on the CPU: x with ``E`` float32 entries (any shape
        ``[..., E]`` holding one token), weight ``[O, E]`` and bias ``[O]`` (or None) float32 and contiguous
        -> ``[..., O]``. None (nothing done) for anything else, so the caller takes torch's path: more than
        one token, another dtype or device, strided weights, or a tensor that needs a gradient. A weight with
        blocks attached (``attach_weight_blocks``) is read from them: the same result, bit for bit."""
        if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2
                or x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() != weight.shape[1]
                or weight.device.type != "cpu" or not weight.is_contiguous()
                or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                                          or bias.numel() != weight.shape[0]))
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (bias is not None and bias.requires_grad)))):
            return None
        rows, cols = weight.shape
        source = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
        self.library.tbrun_linear(source.data_ptr(), cols, *weight_form(weight), rows,
                                  bias.data_ptr() if bias is not None else None, out.data_ptr(),
                                  max(1, kernel_threads()))
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float,
                 add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An RMS norm of a decode token's values: x ``[..., n]`` float32 on the CPU (at most
        ``TOKEN_MAX_ENTRIES`` values: a hidden state ``[1, 1, E]`` or one token's heads ``[1, 1, H, D]``),
        weight ``[n]`` float32 -> ``(x * rsqrt(mean(x^2) + eps) * (offset + weight), x)`` in x's shape: the
        Llama family's RMSNorm at offset 0, Gemma 3's at offset 1. With ``add`` (x's shape) the sum x + add is
        what is normalised and returned second: a decoder layer's residual and the norm after it in one call.
        None (nothing done) for anything else, so the caller takes torch's path."""
        float32 = torch.float32
        n = weight.shape[0] if weight.dim() == 1 else -1
        if (x.dtype is not float32 or weight.dtype is not float32 or not x.is_cpu or not weight.is_cpu
                or x.dim() == 0 or x.shape[-1] != n or n == 0 or x.numel() > TOKEN_MAX_ENTRIES
                or not weight.is_contiguous()
                or (add is not None and (add.dtype is not float32 or not add.is_cpu or add.shape != x.shape))
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (add is not None and add.requires_grad)))):
            return None
        source = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(x.shape, dtype=float32)
        total = None
        if add is not None:
            addend = add if add.is_contiguous() else add.contiguous()
            total = torch.empty(x.shape, dtype=float32)
        self.library.tbrun_rms_norm(source.data_ptr(), addend.data_ptr() if total is not None else None,
                                    total.data_ptr() if total is not None else None, x.numel() // n, n,
                                    weight.data_ptr(), offset, eps, out.data_ptr())
        return out, (total if total is not None else x)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """transformers' ``apply_rotary_pos_emb`` for one decode token: q ``[1, H, 1, D]``, k ``[1, KvH, 1, D]``
        float32 on the CPU, cos and sin ``[1, 1, D]`` (one position's row of the tables) -> q and k turned, in
        their shapes. None (nothing done) for anything else (more than one token, another dtype or device, a
        gradient, tables of another width: a partial rotary), so the caller takes torch's path."""
        float32 = torch.float32
        if (q.dtype is not float32 or k.dtype is not float32 or cos.dtype is not float32 or sin.dtype is not float32
                or not q.is_cpu or not k.is_cpu or not cos.is_cpu or not sin.is_cpu or q.dim() != 4 or k.dim() != 4
                or q.shape[0] != 1 or q.shape[2] != 1 or k.shape[0] != 1 or k.shape[2] != 1
                or k.shape[3] != q.shape[3] or q.shape[3] % 2 or cos.numel() != q.shape[3]
                or sin.numel() != q.shape[3]
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))):
            return None
        d = q.shape[3]
        q_source, k_source = q.contiguous(), k.contiguous()
        cos_row, sin_row = cos.contiguous(), sin.contiguous()
        q_out, k_out = torch.empty(q.shape, dtype=float32), torch.empty(k.shape, dtype=float32)
        self.library.tbrun_rope(q_source.data_ptr(), q.shape[1], k_source.data_ptr(), k.shape[1], d,
                                cos_row.data_ptr(), sin_row.data_ptr(), q_out.data_ptr(), k_out.data_ptr())
        return q_out, k_out

    def gated_mlp(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, activation: str,
                  residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """A gated MLP for one token, ``down(act(gate x) * up x)`` (+ residual): x with ``E`` float32 entries
        (any shape ``[..., E]`` holding one token), gate and up ``[I, E]``, down ``[O, I]`` float32 and
        contiguous, ``activation`` one of ``ACTIVATIONS``, residual ``[..., O]`` or None -> ``[..., O]``. The
        three products by ``linear``'s kernel (from attached blocks where a weight has them), the activation and
        the product between them in place, in one call. None (nothing done) for anything else, so the caller
        takes torch's path."""
        float32 = torch.float32
        if (activation not in ACTIVATIONS or x.dtype is not float32 or not x.is_cpu or x.dim() == 0
                or any(w.dtype is not float32 or not w.is_cpu or w.dim() != 2 or not w.is_contiguous()
                       for w in (gate, up, down))
                or x.numel() != gate.shape[1] or x.shape[-1] != gate.shape[1] or up.shape != gate.shape
                or down.shape[1] != gate.shape[0]
                or (residual is not None and (residual.dtype is not float32 or not residual.is_cpu
                                              or residual.shape != (*x.shape[:-1], down.shape[0])))
                or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, up, down)))):
            return None
        inner, width = gate.shape
        source = x if x.is_contiguous() else x.contiguous()
        added = None if residual is None else (residual if residual.is_contiguous() else residual.contiguous())
        out = torch.empty(*x.shape[:-1], down.shape[0], dtype=float32)
        work = self._scratch(2 * inner)
        self.library.tbrun_gated_mlp(source.data_ptr(), width, *weight_form(gate), *weight_form(up), inner,
                                     *weight_form(down), down.shape[0], ACTIVATIONS.index(activation),
                                     added.data_ptr() if added is not None else None, _address(work),
                                     out.data_ptr(), max(1, kernel_threads()))
        return out

    def bind_decode_layer(self, parts: "LayerParts") -> "DecodeLayer | None":
        """A decoder layer of the Llama family's form for one decode token in two kernel calls around its
        attention (``DecodeLayer``), bound to ``parts``' tensors, checked now; None where they are not all
        float32, contiguous and on the CPU in the shapes the sizes give, or the activation is not one of
        ``ACTIVATIONS``."""
        return DecodeLayer.bind(self, parts)

    def bind_token_rows(self, keys: torch.Tensor, values: torch.Tensor, host_keys: torch.Tensor | None = None,
                        host_values: torch.Tensor | None = None) -> "TokenRows | None":
        """Where a layer's decode tokens' K and V go, bound once: keys and values ``[KvH, N, D]`` (a working set's
        slots or a dense cache's positions; D contiguous, any other strides) and optionally the host store's
        ``[capacity, KvH, D]`` (token-major, rows contiguous). ``TokenRows``, whose call writes a token in one
        kernel call; None where it does not apply (not on the CPU, mismatched dtypes or shapes, strided rows)."""
        return TokenRows.bind(self.library.tbrun_write_token, keys, values, host_keys, host_values)

    def bind_value_norms(self, w_o: torch.Tensor, out: torch.Tensor) -> "BoundValueNorms | None":
        """critical(...)'s value norms of a layer's decode tokens (``policies.critical.value_norms`` of one token:
        the mean over each KV group of ``||v W_O^h||_1``) written into ``out`` ``[KvH, capacity]`` float32 (tokens
        at any stride) at each token's position. w_o ``[H, D, E]`` float32 with D contiguous (the output
        projection's weight as ``ModelAdapter.output_projection`` views it; a model's parameter is read as it is:
        no gradient flows into a buffer of norms), checked now; None where it does not apply (another dtype or
        device, D not contiguous, H not a multiple of KvH): the caller keeps torch's form."""
        if (w_o.dtype is not torch.float32 or out.dtype is not torch.float32 or not w_o.is_cpu or not out.is_cpu
                or w_o.dim() != 3 or out.dim() != 2 or w_o.stride(1) != 1 or out.shape[0] == 0
                or w_o.shape[0] % out.shape[0]):
            return None
        return BoundValueNorms(self.library.tbrun_value_norms, w_o, out)

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                         scaling: float) -> torch.Tensor | None:
        """``attention.decode_attention`` on the CPU in one pass over each KV head's keys and one over its
        values: q ``[H, D]``, k, v ``[KvH, N, D]`` float32 (D contiguous, heads and tokens at any strides),
        valid ``[KvH, N]`` bool or None -> ``[H, D]``. A token not valid never counts, whatever its keys and
        values hold (NaN included): its value is not read, nor its key outside a full block of 16. None
        (nothing done) where it does not apply, so the caller takes torch's path: another dtype or device, no
        tokens, a group of more than 16 query heads per KV head, D above 256 or not a multiple of 16, or a
        tensor that needs a gradient."""
        float32 = torch.float32  # (is_cpu and identity checks: no device object per call, 30 calls a step)
        if (q.dtype is not float32 or k.dtype is not float32 or v.dtype is not float32 or not q.is_cpu
                or not k.is_cpu or not v.is_cpu or q.dim() != 2 or k.dim() != 3 or v.shape != k.shape
                or k.shape[2] != q.shape[1] or 0 in k.shape[:2] or k.stride(2) != 1 or v.stride(2) != 1
                or (valid is not None and (valid.dtype is not torch.bool or not valid.is_cpu
                                           or valid.shape != k.shape[:2]))
                or ((q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled())):
            return None
        heads, (kv_heads, tokens, dim) = q.shape[0], k.shape
        if heads % kv_heads or heads // kv_heads > ATTENTION_MAX_GROUP or dim > ATTENTION_MAX_DIM or dim % 16:
            return None
        query = q.detach().contiguous()
        mask = None if valid is None else (valid if valid.stride(1) == 1 else valid.contiguous())
        out = torch.empty(heads, dim, dtype=torch.float32)
        threads = max(1, min(kernel_threads(), kv_heads))
        buffer = self._scratch(threads * (heads // kv_heads) * tokens)
        status = self.library.tbrun_decode_attention(
            query.data_ptr(), heads, kv_heads, dim, k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(),
            v.stride(0), v.stride(1), tokens, mask.data_ptr() if mask is not None else None,
            mask.stride(0) if mask is not None else 0, scaling, out.data_ptr(), _address(buffer), threads)
        return out if status == 0 else None  # (the checks above leave the kernel nothing to refuse)

    def topk_rows(self, rows: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``keep`` largest entries of each row, exactly, in no order: rows ``[r, n]`` float32 (CPU,
        entries contiguous, rows at any stride) -> (values ``[r, keep]`` float32, indices ``[r, keep]``
        long). NaN ranks above everything, as in numpy; ties at the cut keep the first in the row."""
        if rows.device.type != "cpu" or rows.dtype != torch.float32 or rows.dim() != 2:
            raise TypeError(f"[r, n] float32 CPU rows only, got {tuple(rows.shape)} {rows.dtype} on {rows.device}")
        r, n = rows.shape
        if not 0 < keep <= n or n >= 2**31:
            raise ValueError(f"keep {keep} of {n} entries: needs 0 < keep <= n < 2^31")
        base = rows.detach()
        if n > 1 and base.stride(1) != 1:
            base = base.contiguous()
        index = torch.empty((r, keep), dtype=torch.long)
        values = torch.empty((r, keep), dtype=torch.float32)
        if r:
            self.library.tbrun_topk_rows(base.data_ptr(), r, n, base.stride(0), keep, index.data_ptr(),
                                         values.data_ptr(), max(1, min(kernel_threads(), r)))
        return values, index

    def residency_update(self, selected: np.ndarray, slot_pos: np.ndarray, slot_of: np.ndarray,
                         active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``ResidencyMap.update`` on numpy views of the map's rows (written in place): selected ``[r, k]``
        int64, slot_pos ``[r, n + 1]`` int64, slot_of ``[r, capacity + 1]`` int32, active ``[r, n + 1]``
        bool, each with contiguous rows -> (positions, slots ``[r, width]``, counts ``[r]``), ``width`` the
        largest count, padded with position 0 and slot ``n``."""
        r, k = selected.shape
        n = slot_pos.shape[1] - 1
        if r == 0:
            empty = np.zeros((0, 0), dtype=np.int64)
            return empty, empty.copy(), np.zeros(0, dtype=np.int64)
        _check_tables(r, slot_pos, slot_of, active)
        chosen = np.ascontiguousarray(selected, dtype=np.int64)
        if chosen.size and chosen.max() >= slot_of.shape[1] - 1:  # unchecked in the kernel; the last is scratch
            raise ValueError(f"selected position {int(chosen.max())} is past the capacity {slot_of.shape[1] - 1}")
        positions, slots = np.empty((r, k), dtype=np.int64), np.empty((r, k), dtype=np.int64)
        counts = np.zeros(r, dtype=np.int64)
        if r:  # k == 0 too: every row's selection becomes empty and its mask is cleared
            status = self.library.tbrun_residency_update(
                _address(chosen), r, k, _address(slot_pos), _row_stride(slot_pos), _address(slot_of),
                _row_stride(slot_of), slot_of.shape[1], _address(active), _row_stride(active), n, _address(positions),
                _address(slots), _address(counts), kernel_threads())
            if status != 0:  # cannot happen with k <= n (ResidencyMap.update checks it before)
                raise ValueError(f"more missing positions than the {n} slots of a row")
        width = int(counts.max()) if r else 0  # the kernel left the rows at that stride (pad_rows)
        return (positions.reshape(-1)[: r * width].reshape(r, width), slots.reshape(-1)[: r * width].reshape(r, width),
                counts)

    def gather_pairs(self, pairs, positions: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor | None) -> bool:
        """``dst[h, slots[h, j]] = src[h, positions[h, j]]`` for every ``(src, dst)`` of ``pairs`` (``[H, N, D]``
        CPU tensors of one dtype, D contiguous, all sources at the same strides, all destinations too) and
        ``j < counts[h]``; positions, slots ``[H, m]`` long, counts ``[H]`` long or None (all ``m``).
        False (nothing copied) where the layout does not fit; an out-of-range entry raises IndexError. Large
        plans split their copies among ``kernel_threads()``. ``bind_gather_pairs`` checks the tables once."""
        if positions.device.type != "cpu":
            return False
        bound = self.bind_gather_pairs(pairs)
        if bound is None:
            return False
        bound(positions, slots, counts)
        return True

    def bind_gather_pairs(self, pairs) -> "BoundGatherPairs | None":
        """``gather_pairs`` into and out of these tables, their layout checked now (None where it does not fit):
        a layer's fetch at every step then passes only its plan."""
        src0, dst0 = pairs[0]
        if any(s.stride() != src0.stride() or d.stride() != dst0.stride() or s.shape != src0.shape
               or d.shape != dst0.shape or s.dtype != src0.dtype or d.dtype != src0.dtype
               or s.device.type != "cpu" or d.device.type != "cpu" for s, d in pairs):
            return None
        if src0.dim() != 3 or dst0.dim() != 3 or src0.stride(-1) != 1 or dst0.stride(-1) != 1 \
                or dst0.shape[0] != src0.shape[0] or dst0.shape[2] != src0.shape[2]:
            return None
        return BoundGatherPairs(self, pairs)


class BoundGatherPairs:
    """``SelectionKernels.gather_pairs`` on fixed tables (checked by ``bind_gather_pairs``): a call checks the
    plan's layout and copies; the kernel checks every entry against the tables (IndexError, nothing copied)."""

    __slots__ = ("library", "pairs", "sources", "targets", "heads", "layout")

    def __init__(self, kernels: "SelectionKernels", pairs):
        src0, dst0 = pairs[0]
        self.library, self.pairs, self.heads = kernels.library, tuple(pairs), src0.shape[0]
        self.sources = (ctypes.c_void_p * len(pairs))(*(s.data_ptr() for s, _ in pairs))
        self.targets = (ctypes.c_void_p * len(pairs))(*(d.data_ptr() for _, d in pairs))
        size = src0.element_size()
        self.layout = (src0.stride(0) * size, src0.stride(1) * size, src0.shape[1], dst0.stride(0) * size,
                       dst0.stride(1) * size, dst0.shape[1], src0.shape[2] * size)

    def __call__(self, positions: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor | None) -> None:
        """positions, slots ``[H, m]`` long CPU, counts ``[H]`` long or None (all ``m``)."""
        heads = self.heads  # (is_cpu, not device.type: a device object per call, 30 calls a step)
        if (positions.dtype is not torch.long or slots.dtype is not torch.long or not positions.is_cpu
                or not slots.is_cpu or positions.dim() != 2 or positions.shape != slots.shape
                or positions.shape[0] != heads):
            raise ValueError(f"positions {tuple(positions.shape)} {positions.dtype} and slots {tuple(slots.shape)} "
                             f"{slots.dtype} must both be [KvH={heads}, m] long on the CPU")
        m = positions.shape[1]
        if counts is None:
            counts = torch.full((heads,), m, dtype=torch.long)
        elif counts.dtype is not torch.long or not counts.is_cpu or counts.shape != (heads,):
            raise ValueError(f"counts must be [KvH={heads}] long on the CPU; got {tuple(counts.shape)} {counts.dtype} "
                             f"on {counts.device}")
        if not (positions.is_contiguous() and slots.is_contiguous() and counts.is_contiguous()):
            positions, slots, counts = positions.contiguous(), slots.contiguous(), counts.contiguous()
        status = self.library.tbrun_gather_pairs(len(self.pairs), self.sources, self.targets, heads, m,
                                                 positions.data_ptr(), slots.data_ptr(), counts.data_ptr(),
                                                 *self.layout, kernel_threads())
        if status != 0:
            layout = self.layout
            raise IndexError(f"a fetch entry is outside its tables ({layout[2]} source rows, {layout[5]} slots) or a "
                             f"count outside [0, {m}]: nothing was copied")


REDUCTIONS = ("mean", "max")  # the kernels' reduce codes 0 and 1


class _QueryNetworkArgs(ctypes.Structure):
    """selection.cpp's ``QueryNetwork``, field for field."""

    _fields_ = [("norm_weight", ctypes.c_void_p), ("norm_bias", ctypes.c_void_p), ("w1", ctypes.c_void_p),
                ("w2", ctypes.c_void_p), ("work", ctypes.c_void_p), ("raw", ctypes.c_void_p),
                ("queries", ctypes.c_void_p), ("e", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("out_size", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class QueryNetwork:
    """A producer's query network for its bound selection to run in the same call (``bind_select_rows``'s
    ``network``): the weights of ``mlp`` (a ``BoundQueryMLP``, held), the queries' ``scale``, and buffers of
    its own: ``raw`` ``[O]`` (the network's output, the policy's latest queries) and ``queries`` ``[R, g, d]``
    (raw x scale, what the selection reads), both rewritten by every call."""

    __slots__ = ("mlp", "raw", "queries", "e", "args", "address", "_work")

    def __init__(self, mlp: "BoundQueryMLP", scale: float, rows: int, dim: int):
        nw, nb, eps, w1, inner, w2, size = mlp.args
        if size % (rows * dim):
            raise ValueError(f"a query network of {size} outputs does not give {rows} rows of queries of {dim}")
        self.mlp, self.e = mlp, mlp.e
        self.raw = torch.empty(size, dtype=torch.float32)
        self.queries = torch.empty(rows, size // (rows * dim), dim, dtype=torch.float32)
        self._work = np.empty(self.e + inner, dtype=np.float32)
        self.args = _QueryNetworkArgs(nw, nb, w1, w2, _address(self._work), self.raw.data_ptr(),
                                      self.queries.data_ptr(), self.e, inner, size, eps, scale)
        self.address = ctypes.addressof(self.args)


@dataclass(frozen=True)
class LayerParts:
    """A decoder layer's tensors as ``DecodeLayer`` takes them (the adapter's ``_layer_parts``): the norms'
    weights with their offsets (0: Llama's form, 1: Gemma 3's) and eps, the projections' weights ``[out, in]`` and
    biases (or None), the per-head q/k norms (or None), the gated MLP's three and its activation."""

    heads: int
    kv_heads: int
    head_dim: int
    input_norm: torch.Tensor
    input_form: tuple[float, float]
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_form: tuple[float, float]
    wo: torch.Tensor
    bo: torch.Tensor | None
    post_norm: torch.Tensor
    post_form: tuple[float, float]
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    activation: str

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.input_norm, self.wq, self.bq, self.wk, self.bk, self.wv, self.bv, self.q_norm,
                            self.k_norm, self.wo, self.bo, self.post_norm, self.gate, self.up, self.down)
                if t is not None]


DECODE_LAYER_MATRICES = ("wq", "wk", "wv", "wo", "gate", "up", "down")  # each read in its format (weight_form)


class _DecodeLayerArgs(ctypes.Structure):
    """selection.cpp's ``DecodeLayer``, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in ("e", "heads", "kv_heads", "d", "inner", "act", "threads")] + [
        (f"{name}_format", ctypes.c_int64) for name in DECODE_LAYER_MATRICES] + [
        (name, ctypes.c_void_p) for name in ("input_norm", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "wo",
                                             "bo", "post_norm", "gate", "up", "down")] + [
        (name, ctypes.c_float) for name in ("input_offset", "input_eps", "qk_offset", "qk_eps", "post_offset",
                                            "post_eps")]


class DecodeLayer:
    """``SelectionKernels.bind_decode_layer``: a decoder layer for one decode token in two native calls, ``input``
    (norm, q/k/v with their biases and per-head norms, RoPE) and ``output`` (o, residual, norm, gated MLP,
    residual): what ``ModelAdapter``'s per-piece forms take ~10 wrapper calls and ~15 tensor views for. The parts'
    tensors are held and their addresses checked at every call (``current``): a model moved or cast since is
    not read through stale pointers. A projection with blocks attached (``attach_weight_blocks``) is read from
    them, and ``current`` also checks they still stand for it."""

    def __init__(self, kernels: SelectionKernels, parts: LayerParts):
        self.parts = parts
        self.held = parts.tensors()
        self.addresses = [t.data_ptr() for t in self.held]
        self.e, self.inner = parts.wq.shape[1], parts.gate.shape[0]
        self.q_shape = (1, parts.heads, 1, parts.head_dim)
        self.kv_shape = (1, parts.kv_heads, 1, parts.head_dim)
        self.input_kernel = kernels.library.tbrun_decode_layer_input
        self.output_kernel = kernels.library.tbrun_decode_layer_output
        self.scratch = kernels._scratch
        forms = {name: weight_form(getattr(parts, name)) for name in DECODE_LAYER_MATRICES}
        # the weights read from blocks, with the versions they were bound at (current)
        self.block_read = [(getattr(parts, name), getattr(parts, name)._version) for name, (_, code) in forms.items()
                           if code != 0]
        address = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        pointers = {name: address(getattr(parts, name)) for name in (
            "input_norm", "bq", "bk", "bv", "q_norm", "k_norm", "bo", "post_norm")}
        pointers.update({name: form[0] for name, form in forms.items()})
        self.args = _DecodeLayerArgs(
            self.e, parts.heads, parts.kv_heads, parts.head_dim, self.inner, ACTIVATIONS.index(parts.activation),
            max(1, kernel_threads()), *(forms[name][1] for name in DECODE_LAYER_MATRICES),
            *(pointers[name] for name in ("input_norm", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "wo",
                                          "bo", "post_norm", "gate", "up", "down")),
            *parts.input_form, *parts.qk_form, *parts.post_form)
        self.address = ctypes.addressof(self.args)

    @classmethod
    def bind(cls, kernels: SelectionKernels, parts: LayerParts) -> "DecodeLayer | None":
        e, h, kv, d = parts.wq.shape[1] if parts.wq.dim() == 2 else -1, parts.heads, parts.kv_heads, parts.head_dim
        inner = parts.gate.shape[0] if parts.gate.dim() == 2 else -1
        shapes = [(parts.input_norm, (e,)), (parts.wq, (h * d, e)), (parts.bq, (h * d,)), (parts.wk, (kv * d, e)),
                  (parts.bk, (kv * d,)), (parts.wv, (kv * d, e)), (parts.bv, (kv * d,)), (parts.q_norm, (d,)),
                  (parts.k_norm, (d,)), (parts.wo, (e, h * d)), (parts.bo, (e,)), (parts.post_norm, (e,)),
                  (parts.gate, (inner, e)), (parts.up, (inner, e)), (parts.down, (e, inner))]
        if (parts.activation not in ACTIVATIONS or (parts.q_norm is None) != (parts.k_norm is None) or d % 2
                or e * max(h, kv) * d * inner <= 0
                or any(t is not None and (t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous()
                                          or tuple(t.shape) != shape) for t, shape in shapes)):
            return None
        return cls(kernels, parts)

    def current(self) -> bool:
        """Whether every bound tensor is where it was bound (a cast or a move replaces a parameter's memory), and
        the weights read from blocks are unchanged since (an in-place update leaves their blocks stale)."""
        return (all(t.data_ptr() == a for t, a in zip(self.held, self.addresses))
                and all(t._version == version for t, version in self.block_read))

    def input(self, hidden: torch.Tensor, cos: torch.Tensor | None,
              sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """hidden ``[1, 1, E]`` float32, (cos, sin) one position's ``[.., D]`` rows or None (not turned) ->
        x ``[1, 1, E]``, q ``[1, H, 1, D]``, k and v ``[1, KvH, 1, D]``; None (nothing done) for another input."""
        if (hidden.dtype is not torch.float32 or not hidden.is_cpu or hidden.numel() != self.e
                or not hidden.is_contiguous() or (cos is not None and (
                    cos.dtype is not torch.float32 or sin.dtype is not torch.float32 or not cos.is_contiguous()
                    or not sin.is_contiguous() or cos.numel() != self.parts.head_dim
                    or sin.numel() != self.parts.head_dim))):
            return None
        self.args.threads = max(1, kernel_threads())
        x = torch.empty(hidden.shape, dtype=torch.float32)
        q, k, v = (torch.empty(self.q_shape, dtype=torch.float32), torch.empty(self.kv_shape, dtype=torch.float32),
                   torch.empty(self.kv_shape, dtype=torch.float32))
        self.input_kernel(self.address, hidden.data_ptr(), cos.data_ptr() if cos is not None else None,
                          sin.data_ptr() if sin is not None else None, x.data_ptr(), q.data_ptr(), k.data_ptr(),
                          v.data_ptr())
        return x, q, k, v

    def output(self, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor | None:
        """hidden ``[1, 1, E]`` (the layer's input), attention ``[1, H, 1, D]`` float32 -> the next hidden
        ``[1, 1, E]``; None (nothing done) for another input."""
        parts = self.parts
        if (hidden.dtype is not torch.float32 or not hidden.is_cpu or hidden.numel() != self.e
                or not hidden.is_contiguous() or attention.dtype is not torch.float32 or not attention.is_cpu
                or attention.numel() != parts.heads * parts.head_dim or not attention.is_contiguous()):
            return None
        self.args.threads = max(1, kernel_threads())
        out = torch.empty(hidden.shape, dtype=torch.float32)
        work = self.scratch(2 * self.e + 2 * self.inner)
        self.output_kernel(self.address, hidden.data_ptr(), attention.data_ptr(), _address(work), out.data_ptr())
        return out


class TokenRows:
    """``SelectionKernels.bind_token_rows``: a layer's decode token's K and V rows written where the backend keeps
    them (a slot, and the host store's position) in one call. The bound tensors are held, so their memory stays."""

    def __init__(self, kernel, keys: torch.Tensor, values: torch.Tensor, host_keys: torch.Tensor | None,
                 host_values: torch.Tensor | None):
        self.kernel, self.keys, self.values = kernel, keys, values
        self.host_keys, self.host_values = host_keys, host_values
        self.heads, self.slots, self.dim = keys.shape
        self.dtype, self.itemsize = keys.dtype, keys.element_size()
        self.row_bytes = self.dim * self.itemsize
        self.head_stride = keys.stride(0) * self.itemsize
        self.slot_stride = keys.stride(1) * self.itemsize
        self.capacity = host_keys.shape[0] if host_keys is not None else 0
        self.position_stride = host_keys.stride(0) * self.itemsize if host_keys is not None else 0
        # the bound tensors are held and never resized: their addresses are fixed
        self._bases = (keys.data_ptr(), values.data_ptr(),
                       host_keys.data_ptr() if host_keys is not None else 0,
                       host_values.data_ptr() if host_values is not None else 0)

    @classmethod
    def bind(cls, kernel, keys: torch.Tensor, values: torch.Tensor, host_keys: torch.Tensor | None,
             host_values: torch.Tensor | None) -> "TokenRows | None":
        hosted = (host_keys, host_values)
        if ((host_keys is None) != (host_values is None) or keys.dim() != 3 or keys.shape != values.shape
                or keys.stride() != values.stride() or keys.stride(2) != 1 or keys.dtype != values.dtype
                or not keys.is_cpu or not values.is_cpu):
            return None
        if host_keys is not None and any(
                t.dim() != 3 or t.shape[1:] != (keys.shape[0], keys.shape[2]) or t.dtype != keys.dtype or not t.is_cpu
                or t.stride() != host_keys.stride() or t.stride(2) != 1 or t.stride(1) != keys.shape[2]
                for t in hosted):
            return None
        return cls(kernel, keys, values, host_keys, host_values)

    def __call__(self, k: torch.Tensor, v: torch.Tensor, slot: int, position: int | None = None) -> bool:
        """Write k, v ``[KvH, D]`` to ``slot`` and (bound with the host store) to the host's ``position``.
        False (nothing written) where k and v are not the bound dtype and shape on the CPU with D contiguous and
        the same strides: the caller writes them. A slot or position out of range raises ``IndexError``."""
        if (k.dtype != self.dtype or v.dtype != self.dtype or not k.is_cpu or not v.is_cpu or k.shape != v.shape
                or k.shape != (self.heads, self.dim) or k.stride() != v.stride() or k.stride(1) != 1):
            return False
        if not 0 <= slot < self.slots or (self.host_keys is not None and not 0 <= position < self.capacity):
            raise IndexError(f"slot {slot} of {self.slots} or position {position} of {self.capacity} out of range")
        keys, values, host_keys, host_values = self._bases
        slot_offset = slot * self.slot_stride
        host_offset = position * self.position_stride if host_keys else 0
        self.kernel(k.data_ptr(), v.data_ptr(), self.heads, self.row_bytes, k.stride(0) * self.itemsize,
                    keys + slot_offset, values + slot_offset, self.head_stride,
                    host_keys + host_offset if host_keys else None, host_values + host_offset if host_values else None,
                    self.row_bytes)
        return True


class BoundValueNorms:
    """``SelectionKernels.bind_value_norms``: one layer's output projection and value-norm row, checked once; a
    call checks only the token's values (30 calls a step)."""

    __slots__ = ("kernel", "w_o", "out", "args", "kv_heads", "d", "capacity")

    def __init__(self, kernel, w_o: torch.Tensor, out: torch.Tensor):
        self.kernel, self.w_o, self.out = kernel, w_o, out  # (held: the addresses point into them)
        heads, self.d, width = w_o.shape
        self.kv_heads, self.capacity = out.shape
        self.args = (heads, self.d, width, w_o.data_ptr(), w_o.stride(0), w_o.stride(2))

    def __call__(self, v: torch.Tensor, position: int) -> bool:
        """Writes the norms of v ``[KvH, D]`` (float32 on the CPU, D contiguous) at ``position``; False (nothing
        written) where v is not that or the position is outside the row."""
        if (v.dtype is not torch.float32 or not v.is_cpu or v.dim() != 2 or v.shape[0] != self.kv_heads
                or v.shape[1] != self.d or v.stride(1) != 1 or not 0 <= position < self.capacity
                or (v.requires_grad and torch.is_grad_enabled())):
            return False
        heads, d, width, w, h_stride, e_stride = self.args
        out = self.out
        self.kernel(v.data_ptr(), self.kv_heads, v.stride(0), heads, d, width, w, h_stride, e_stride,
                    out.data_ptr() + position * out.stride(1) * 4, out.stride(0))
        return True


class _ReweightArgs(ctypes.Structure):
    """selection.cpp's ``Reweight``, field for field."""

    _fields_ = [("norms", ctypes.c_void_p), ("norm_stride", ctypes.c_int64), ("norms_bf16", ctypes.c_int64),
                ("logit_kind", ctypes.c_int64), ("alpha", ctypes.c_double), ("eps", ctypes.c_float),
                ("first_mul", ctypes.c_float), ("first_add", ctypes.c_float), ("second_mul", ctypes.c_float)]


class Reweight:
    """critical(...)'s two stages for a bound selection to apply to its base's scores in the same call
    (``bind_select_rows``'s ``reweight``): the rows' value norms ``[R, capacity]`` (float32 or bfloat16, tokens
    contiguous; held), ``alpha`` and ``eps`` (``CriticalPolicy``), whether the base's scores are logits
    (``kind`` "logit") or masses ("mass"), and the keep bonus of each stage (``HeldTerms`` of the base's kind for
    the first, of masses for the second; None: none)."""

    __slots__ = ("norms", "args", "address")

    def __init__(self, norms: torch.Tensor, alpha: float, eps: float, kind: str,
                 first: "HeldTerms | None" = None, second: "HeldTerms | None" = None):
        if norms.dim() != 2 or norms.dtype not in (torch.float32, torch.bfloat16) or not norms.is_cpu \
                or norms.stride(1) != 1:
            raise ValueError(f"value norms {norms.dtype} {tuple(norms.shape)} on {norms.device} are not [rows, "
                             "tokens] float32 or bfloat16 on the CPU with tokens contiguous")
        if kind not in ("mass", "logit"):
            raise ValueError(f"score kind {kind!r} is not 'mass' or 'logit'")
        if second is not None and second.add != 0.0:
            raise ValueError("the value-aware stage's scores are masses: its keep bonus is a factor")
        self.norms = norms
        first_mul, first_add = (1.0, 0.0) if first is None else (first.mul, first.add)
        self.args = _ReweightArgs(norms.data_ptr(), norms.stride(0), int(norms.dtype == torch.bfloat16),
                                  int(kind == "logit"), alpha, eps, first_mul, first_add,
                                  1.0 if second is None else second.mul)
        self.address = ctypes.addressof(self.args)


class _RowCopiesArgs(ctypes.Structure):
    """selection.cpp's ``RowCopies``, field for field."""

    _fields_ = [("sources", ctypes.c_void_p), ("targets", ctypes.c_void_p), ("src_row", ctypes.c_int64),
                ("dst_row", ctypes.c_int64), ("row_bytes", ctypes.c_int64), ("src_rows", ctypes.c_int64),
                ("dst_rows", ctypes.c_int64), ("nanoseconds", ctypes.c_void_p)]


class RowCopies:
    """What a producer's bound selection copies as it places each row (``bind_row_copies``): row ``r``'s
    positions from its host keys and values into its key and value slots. ``timed``: the kernel adds the time
    it spends copying (with rows split among threads, the longest any thread copied) to a counter that
    ``take_seconds`` reads and resets, so that a profile counts it as copying, not selecting."""

    __slots__ = ("args", "address", "rows", "_pointers", "_keep", "_spent")

    def __init__(self, rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
        sources = [t for row in rows for t in row[:2]]
        targets = [t for row in rows for t in row[2:]]
        self.rows = len(rows)
        pointers = ctypes.c_void_p * len(sources)
        self._pointers = (pointers(*(t.data_ptr() for t in sources)), pointers(*(t.data_ptr() for t in targets)))
        self._keep = tuple(sources + targets)  # the memory the addresses point into
        self._spent = ctypes.c_int64(0)
        size = sources[0].element_size()
        self.args = _RowCopiesArgs(ctypes.addressof(self._pointers[0]), ctypes.addressof(self._pointers[1]),
                                   sources[0].stride(0) * size, targets[0].stride(0) * size,
                                   sources[0].shape[1] * size, sources[0].shape[0], targets[0].shape[0], None)
        self.address = ctypes.addressof(self.args)

    @classmethod
    def bind(cls, rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> "RowCopies | None":
        tensors = [t for row in rows for t in row]
        if not rows or any(len(row) != 4 for row in rows):
            return None
        first_source, first_target = rows[0][0], rows[0][2]
        alike = all(t.dim() == 2 and t.is_cpu and t.dtype == first_source.dtype and t.stride(1) == 1
                    and t.shape[1] == first_source.shape[1] for t in tensors)
        sources_alike = all(t.stride(0) == first_source.stride(0) and t.shape[0] == first_source.shape[0]
                            for row in rows for t in row[:2])
        targets_alike = all(t.stride(0) == first_target.stride(0) and t.shape[0] == first_target.shape[0]
                            for row in rows for t in row[2:])
        return cls(rows) if alike and sources_alike and targets_alike else None

    @property
    def timed(self) -> bool:
        return self.args.nanoseconds is not None

    @timed.setter
    def timed(self, on: bool) -> None:
        self.args.nanoseconds = ctypes.addressof(self._spent) if on else None

    def take_seconds(self) -> float:
        """Seconds the kernel spent copying since the last call (0 unless ``timed``)."""
        spent, self._spent.value = self._spent.value, 0
        return spent / 1e9


class BoundSelectRows:
    """``SelectionKernels.select_rows`` on fixed keys and residency tables, checked once at construction.

    keys ``[R, d, capacity]`` float32, bfloat16 or int8 (with ``scales`` ``[R, capacity]`` float16), tokens
    contiguous; the tables as ``residency_update`` reads them. A call passes the queries and how many of the
    keys' tokens the step scores, so a producer's selection costs one kernel call and a few checks: the
    ~20 checks and conversions of ``select_rows`` at every step were as long as the kernel at 4k tokens
    (profiled in the engine, where the model's weights have just left Python's data out of the caches).
    """

    __slots__ = ("kernel", "args", "rows", "dim", "capacity", "n", "of_length", "reduce", "int8", "prefilter",
                 "page_args", "copies", "network", "reweight", "_keep", "_layout")

    def __init__(self, kernels: SelectionKernels, keys: torch.Tensor, slot_pos: np.ndarray, slot_of: np.ndarray,
                 active: np.ndarray, reduction: str = "mean", scales: torch.Tensor | None = None,
                 pages: "PageRows | None" = None, copies: RowCopies | None = None,
                 network: QueryNetwork | None = None, reweight: Reweight | None = None):
        self.reduce = _reduce_code(reduction)
        if keys.dim() != 3:
            raise ValueError(f"keys {tuple(keys.shape)} are not [rows, d, tokens]")
        rows, d, capacity = keys.shape
        _check_keys(rows, d, keys, scales)
        _check_tables(rows, slot_pos, slot_of, active)
        self.rows, self.dim, self.capacity = rows, d, capacity
        self.n, self.of_length = slot_pos.shape[1] - 1, slot_of.shape[1]
        if copies is not None and (copies.rows != rows or copies.args.dst_rows < self.n + 1
                                   or copies.args.src_rows < capacity):
            raise ValueError(f"row copies of {copies.rows} rows ({copies.args.src_rows} tokens, {copies.args.dst_rows} "
                             f"slots) do not serve {rows} rows of {capacity} tokens and {self.n + 1} slots")
        self.copies = copies
        if network is not None and (network.queries.shape[0] != rows or network.queries.shape[2] != d):
            raise ValueError(f"a query network giving queries {tuple(network.queries.shape)} does not serve {rows} rows "
                             f"of keys of {d}")
        self.network = network
        if reweight is not None and (reweight.norms.shape[0] != rows or reweight.norms.shape[1] < capacity
                                     or pages is not None):
            raise ValueError(f"value norms {tuple(reweight.norms.shape)} do not serve {rows} rows of {capacity} tokens"
                             if pages is None else "a reweight with a page prefilter (the prefilter ranks pages first)")
        self.reweight = reweight
        self.int8 = keys.dtype == torch.int8
        held = _page_tensors(pages)
        self.prefilter, self.page_args = None, ((None, 0, 0, 0), (None, 0) * 4)
        if pages is not None:
            _check_pages(rows, d, capacity, keys.dtype, pages)
            self.prefilter = pages.prefilter
            bounds, *rest = held
            self.page_args = ((bounds.data_ptr(), bounds.stride(0), bounds.stride(1), pages.prefilter.page),
                              sum(((None, 0) if t is None else (t.data_ptr(), t.stride(0)) for t in rest), ()))
        self._keep = (keys, scales, slot_pos, slot_of, active) + held  # the memory the addresses below point into
        self._layout = _layout(keys, scales, *held) + (self.reduce, self.prefilter)
        base = keys.detach()
        key_args = (base.data_ptr(), base.stride(0), base.stride(1))
        if self.int8:
            self.kernel = kernels.library.tbrun_select_rows_int8
            scale_args = (scales.data_ptr(), scales.stride(0))
        else:
            self.kernel = (kernels.library.tbrun_select_rows if keys.dtype == torch.float32
                           else kernels.library.tbrun_select_rows_bf16)
            scale_args = ()
        tables = (_address(slot_pos), _row_stride(slot_pos), _address(slot_of), _row_stride(slot_of), self.of_length,
                  _address(active), _row_stride(active), self.n)
        self.args = (key_args, scale_args, tables)

    def matches(self, keys: torch.Tensor, reduction: str, scales: torch.Tensor | None = None,
                pages: "PageRows | None" = None, copies: RowCopies | None = None,
                network: QueryNetwork | None = None, reweight: Reweight | None = None) -> bool:
        """Whether these keys (and scales and page bounds) are the memory and layout bound, under the same rule
        and prefilter, with the same copies, network and reweight: then a call reads them as bound (the bound
        tensors are held, so their memory cannot be another tensor's)."""
        prefilter = None if pages is None else pages.prefilter
        return (self.copies is copies and self.network is network and self.reweight is reweight
                and self._layout == _layout(keys, scales, *_page_tensors(pages)) + (_reduce_code(reduction), prefilter))

    def __call__(self, queries: torch.Tensor | None, m: int, lo: int, hi: int, keep: int, x: torch.Tensor | None = None,
                 held: "HeldTerms | None" = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """queries ``[R, g, d]`` float32 contiguous CPU, or with a bound ``network`` None and the producer's input
        x ``[E]`` (float32 contiguous CPU: the kernel runs the network, its queries in ``network.queries``); the
        first ``m`` tokens of the keys scored, the top ``keep`` of candidates ``[lo, hi)`` selected, the scores of
        the positions the rows' slots hold raised by ``held`` (the top-k's hysteresis, ``ranking.favour_held``;
        not with a page prefilter). -> (positions, slots ``[R, width]``, counts ``[R]``)."""
        rows, n = self.rows, self.n
        network = (None, None)
        if x is not None:
            if (self.network is None or x.dtype is not torch.float32 or not x.is_cpu or x.numel() != self.network.e
                    or not x.is_contiguous()):
                raise ValueError(f"select_rows: x {x.dtype} {tuple(x.shape)} on {x.device} is not the bound network's "
                                 "contiguous float32 CPU input" if self.network is not None else
                                 "select_rows: x given, but no query network is bound")
            queries, network = self.network.queries, (self.network.address, x.data_ptr())
        elif (queries.dtype is not torch.float32 or not queries.is_cpu or queries.dim() != 3 or queries.shape[0] != rows
                or queries.shape[2] != self.dim or queries.shape[1] == 0 or not queries.is_contiguous()):
            raise ValueError(f"select_rows: queries {queries.dtype} {tuple(queries.shape)} on {queries.device} are not "
                             f"[{rows}, g > 0, {self.dim}] contiguous float32 CPU")
        if not (0 <= lo and 0 < keep <= hi - lo < 2**31 and hi <= m <= self.capacity and keep <= n
                and hi < self.of_length):
            raise ValueError(f"select_rows: keep {keep} of candidates [{lo}, {hi}) needs 0 < keep <= hi - lo < 2^31, "
                             f"hi <= {m} tokens scored (of {self.capacity}), keep <= {n} slots, hi < {self.of_length} "
                             "table entries")
        out = np.empty(rows * (2 * keep + 1), dtype=np.int64)  # one allocation: positions, slots, counts
        positions = out[: rows * keep].reshape(rows, keep)
        slots = out[rows * keep : 2 * rows * keep].reshape(rows, keep)
        counts = out[2 * rows * keep :]
        counts.fill(0)
        key_args, scale_args, tables = self.args
        base, size = _address(out), rows * keep * 8  # the three outputs' addresses, from the one allocation
        outputs = (base, base + size, base + 2 * size, max(1, min(kernel_threads(), rows)))
        kept = 0 if self.prefilter is None else self.prefilter.kept_pages(m, lo, hi, keep)
        if held is not None and self.prefilter is not None:
            raise ValueError("select_rows: held terms with a page prefilter (the prefilter ranks pages first)")
        if held is not None and self.reweight is not None:
            raise ValueError("select_rows: held terms with a reweight (its stages take the keep bonus themselves)")
        reweight = None if self.reweight is None else self.reweight.address
        favour = (1.0, 0.0) if held is None else (held.mul, held.add)
        copies = None if self.copies is None else self.copies.address
        if self.int8:
            status = self.kernel(self.reduce, queries.data_ptr(), rows, queries.shape[1], self.dim, *key_args, m,
                                 *scale_args, lo, hi, keep, *tables, *outputs, *self.page_args[0], kept,
                                 *self.page_args[1], copies, *network, *favour, reweight)
        else:
            status = self.kernel(self.reduce, queries.data_ptr(), rows, queries.shape[1], self.dim, *key_args, m, lo,
                                 hi, keep, *tables, *outputs, *self.page_args[0], kept,
                                 *self.page_args[1], copies, *network, *favour, reweight)
        if status == -3:  # cannot happen with the tables checked at binding; the map's rows are then placed without
            # their K/V: the backend must not go on (an error from generate closes it)
            raise IndexError("a selected position or slot is outside the bound copies' tables")
        if status != 0:  # cannot happen with keep <= n (checked above)
            raise ValueError(f"more missing positions than the {n} slots of a row")
        width = max(counts.tolist()) if rows else 0  # the kernel left the rows at that stride (pad_rows)
        return (out[: rows * width].reshape(rows, width), out[rows * keep : rows * (keep + width)].reshape(rows, width),
                counts)


class BoundKeyWriter:
    """``keys[layer, :, :, position] = k @ projections[layer]`` (per KV head) in one native call: projections
    ``[L, KvH, D, d']`` float32 contiguous, keys ``[L, KvH, d', capacity]`` float32, bfloat16 (rounded to
    nearest even, as torch's conversion) or int8 codes, quantised as ``quantize_keys`` does with their float16
    ``scales [L, KvH, capacity]``, on the CPU, all bound and held. A call checks only the token's key, the layer
    and the position: a layer's matrix product, view and strided copy in torch took ~70 us of calls, 2 ms a
    decode step of the embedded model (py-spy, 7.5k tokens); an int8 cache's quantisation as many again."""

    __slots__ = ("kernel", "layers", "heads", "dim", "dims", "capacity", "code", "size", "proj", "proj_layer",
                 "out", "out_strides", "scales", "scale_strides", "_keep", "_layout")

    CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # the cache's dtype -> out_code (PROJECT_*)

    def __init__(self, kernels: SelectionKernels, projections: torch.Tensor, keys: torch.Tensor,
                 scales: torch.Tensor | None):
        self.code = self.CODES[keys.dtype]
        self.kernel = kernels.library.tbrun_project_token
        self.layers, self.heads, self.dim, self.dims = projections.shape
        self.capacity, self.size = keys.shape[3], keys.element_size()
        self._keep = (projections, keys, scales)  # the memory the addresses below point into
        self._layout = _layout(projections, keys, scales)
        self.proj, self.proj_layer = projections.data_ptr(), projections.stride(0) * 4
        self.out = keys.data_ptr()
        self.out_strides = keys.stride()[:3]  # layer, head, dim (elements); tokens contiguous
        self.scales = scales.data_ptr() if scales is not None else 0
        self.scale_strides = scales.stride()[:2] if scales is not None else (0, 0)  # layer, head; tokens contiguous

    @classmethod
    def bind(cls, kernels: SelectionKernels, projections: torch.Tensor, keys: torch.Tensor,
             scales: torch.Tensor | None = None) -> "BoundKeyWriter | None":
        """None unless projections ``[L, KvH, D, d']`` are float32 contiguous, keys ``[L, KvH, d', capacity]`` float32
        or bfloat16 (``scales`` None), or int8 with ``scales`` ``[L, KvH, capacity]`` float16, tokens contiguous in
        both, all on the CPU, with d' of at most 256."""
        if (projections.dim() != 4 or keys.dim() != 4 or projections.device.type != "cpu"
                or keys.device.type != "cpu" or projections.dtype != torch.float32
                or keys.dtype not in cls.CODES or not projections.is_contiguous()
                or keys.stride(3) != 1 or tuple(keys.shape[:3]) != (projections.shape[0], projections.shape[1],
                                                                    projections.shape[3])
                or not 0 < projections.shape[3] <= 256):
            return None
        if keys.dtype == torch.int8:
            if (scales is None or scales.dtype != torch.float16 or scales.device.type != "cpu"
                    or tuple(scales.shape) != (keys.shape[0], keys.shape[1], keys.shape[3]) or scales.stride(2) != 1):
                return None
        elif scales is not None:
            return None
        return cls(kernels, projections, keys, scales)

    def matches(self, projections: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor | None = None) -> bool:
        """Whether these are the tensors bound (the same memory, shape, strides and type)."""
        return self._layout == _layout(projections, keys, scales)

    def __call__(self, layer: int, position: int, k: torch.Tensor) -> bool:
        """Writes ``k [KvH, D]`` (float32 CPU, head dim contiguous) of ``layer`` (an index of the bound layers)
        at ``position``; False for a key of another type or shape (nothing written), or one whose projection
        an int8 cache cannot take (a NaN or an infinity: part may be written), so the caller takes torch's
        path. A layer or position out of range raises."""
        if (k.dtype != torch.float32 or k.device.type != "cpu" or k.dim() != 2 or k.shape[0] != self.heads
                or k.shape[1] != self.dim or k.stride(1) != 1):
            return False
        if not (0 <= layer < self.layers and 0 <= position < self.capacity):
            raise IndexError(f"key of layer {layer}, position {position}: the cache holds {self.layers} layers of "
                             f"{self.capacity} positions")
        layer_stride, head_stride, dim_stride = self.out_strides
        out = self.out + (layer * layer_stride + position) * self.size
        proj = self.proj + layer * self.proj_layer
        scale_layer, scale_head = self.scale_strides  # (0, 0) and a null pointer without an int8 cache's scales
        scales = self.scales + (layer * scale_layer + position) * 2 if self.scales else 0
        status = self.kernel(k.data_ptr(), self.heads, self.dim, k.stride(0), proj, self.dims, out, self.code,
                             head_stride, dim_stride, scales, scale_head)
        if status == -2:  # a NaN or an infinity in a projected key: quantised by torch, as the prefill's are
            return False
        if status != 0:  # cannot happen: d' <= 256, the cache's code and an int8 cache's scales checked when bound
            raise ValueError(f"project_token refused d' {self.dims} (the kernel takes up to 256) or cache code "
                             f"{self.code}")
        return True


class BoundQueryMLP:
    """``SelectionKernels.query_mlp`` with its weights checked once: a call checks only the token's input.

    The weights are read from their memory at every call (an in-place update is seen); ``matches`` tells
    whether these are still the tensors a module holds (a replaced parameter needs a new binding).
    """

    __slots__ = ("kernels", "tensors", "memory", "args", "e")

    def __init__(self, kernels: SelectionKernels, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float,
                 w1: torch.Tensor, w2: torch.Tensor):
        named = {"norm weight": norm_weight, "w1": w1, "w2": w2,
                 **({"norm bias": norm_bias} if norm_bias is not None else {})}
        for name, tensor in named.items():
            _check_float32_cpu(f"query_mlp: {name}", tensor)
        e, inner, size = norm_weight.numel(), w1.shape[0], w2.shape[0] if w2.dim() == 2 else 0
        if ((norm_bias is not None and norm_bias.numel() != e) or w1.dim() != 2 or w1.shape[1] != e or w2.dim() != 2
                or w2.shape[1] != inner or e == 0):
            raise ValueError(f"query_mlp: norm {tuple(norm_weight.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} "
                             "do not chain as [E] -> [I, E] -> [O, I]")
        self.kernels, self.tensors, self.e = kernels, (norm_weight, norm_bias, w1, w2), e
        # the memory the addresses point into, held (a parameter given new memory by ``.data = ...`` frees the
        # old one only when nothing holds it): an address that matches is these very tensors
        self.memory = tuple(t.detach() if t is not None else None for t in (norm_weight, norm_bias, w1, w2))
        self.args = (norm_weight.data_ptr(), norm_bias.data_ptr() if norm_bias is not None else None, float(eps),
                     w1.data_ptr(), inner, w2.data_ptr(), size)

    def matches(self, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float, w1: torch.Tensor,
                w2: torch.Tensor) -> bool:
        """Whether these are still the parameters bound, in the memory and shapes bound (a replaced parameter,
        or one given new memory, needs a new binding)."""
        held, args = self.tensors, self.args
        return (held[0] is norm_weight and held[1] is norm_bias and held[2] is w1 and held[3] is w2
                and args[0] == norm_weight.data_ptr() and args[3] == w1.data_ptr() and args[5] == w2.data_ptr()
                and (norm_bias is None or args[1] == norm_bias.data_ptr()) and args[2] == eps
                and w1.shape == self.memory[2].shape and w2.shape == self.memory[3].shape
                and norm_weight.shape == self.memory[0].shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[E]`` float32 contiguous CPU -> ``[O]``."""
        _check_float32_cpu("query_mlp: x", x)
        if x.numel() != self.e:
            raise ValueError(f"query_mlp: x {tuple(x.shape)} and the norm's {self.e} features do not chain as "
                             "[E] -> [I, E] -> [O, I]")
        nw, nb, eps, w1, inner, w2, size = self.args
        work = self.kernels._scratch(self.e + inner)
        out = torch.empty(size, dtype=torch.float32)
        self.kernels.library.tbrun_query_mlp(x.data_ptr(), self.e, nw, nb, eps, w1, inner, w2, size, _address(work),
                                             out.data_ptr())
        return out


@dataclass(frozen=True)
class WeightBlocks:
    """A linear layer's float32 weight ``[O, I]`` as a GGUF file stores it: ``blocks`` uint8 ``[O, I / 32 *
    BLOCK_BYTES[format]]``, each row's 32-weight blocks in ggml's ``q4_1`` or ``q8_0`` layout (selection.cpp,
    ``matvec_blocks``), which widen to exactly the weight's values. Checked at construction: shapes and format."""

    format: str
    blocks: torch.Tensor

    def __post_init__(self) -> None:
        if self.format not in BLOCK_BYTES:
            raise ValueError(f"weight blocks' format must be one of {tuple(BLOCK_BYTES)}, got {self.format!r}")
        b = self.blocks
        if (b.dtype is not torch.uint8 or b.dim() != 2 or not b.is_cpu or not b.is_contiguous()
                or b.shape[1] % BLOCK_BYTES[self.format] != 0):
            raise ValueError(f"{self.format} blocks must be a contiguous uint8 CPU tensor [rows, blocks * "
                             f"{BLOCK_BYTES[self.format]}], got {b.dtype} {tuple(b.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's ``(O, I)``."""
        return self.blocks.shape[0], self.blocks.shape[1] // BLOCK_BYTES[self.format] * WEIGHT_BLOCK


# id(weight) -> (a weak reference to it, its blocks, its address and version when they were attached); an entry goes
# with its weight (a tensor compares elementwise, so it cannot be a WeakKeyDictionary's key)
_ATTACHED: dict[int, tuple[weakref.ref, WeightBlocks, int, int]] = {}


def attach_weight_blocks(weight: torch.Tensor, blocks: WeightBlocks) -> None:
    """Let the one-token kernels read ``weight`` (float32 ``[O, I]`` on the CPU) from ``blocks``, which the caller
    has checked widen to exactly its values (``gguf_weights.attach_gguf_blocks`` does). While the weight is
    where and as it was (same memory, no in-place change since: its ``_version``), ``linear``, ``gated_mlp`` and a
    bound ``DecodeLayer`` read the blocks; after a move, a cast or an in-place update they read the weight
    again. (A change through ``weight.data``, which torch does not count, is not seen: don't.)"""
    if weight.dtype is not torch.float32 or not weight.is_cpu or tuple(weight.shape) != blocks.shape:
        raise ValueError(f"{blocks.format} blocks of shape {blocks.shape} cannot stand for a {weight.dtype} weight "
                         f"of shape {tuple(weight.shape)} on {weight.device}")
    key = id(weight)
    _ATTACHED[key] = (weakref.ref(weight, lambda _, key=key: _ATTACHED.pop(key, None)), blocks, weight.data_ptr(),
                      weight._version)


def weight_blocks(weight: torch.Tensor) -> WeightBlocks | None:
    """The blocks attached to ``weight`` while they still stand for it (see ``attach_weight_blocks``), else None."""
    entry = _ATTACHED.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[2] != weight.data_ptr() or entry[3] != weight._version:
        return None
    return entry[1]


def weight_form(weight: torch.Tensor) -> tuple[int, int]:
    """``(address, format code)`` tbrun_linear reads ``weight`` by: its attached blocks, else its float32 values."""
    blocks = weight_blocks(weight)
    if blocks is None:
        return weight.data_ptr(), 0
    return blocks.blocks.data_ptr(), WEIGHT_FORMATS.index(blocks.format)


def _check_float32_cpu(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu" or tensor.dtype != torch.float32 or not tensor.is_contiguous():
        raise TypeError(f"{name} must be a contiguous float32 CPU tensor, got {tensor.dtype} on {tensor.device}")


def _reduce_code(reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return REDUCTIONS.index(reduction)


def _check_scoring(queries: torch.Tensor, keys: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    """What the scoring kernels read: queries ``[R, g, d]`` float32 with ``g, d > 0``, keys ``[R, d, m]``
    float32, bfloat16 or int8 with tokens contiguous, all on the CPU; int8 keys (only they) with their
    ``scales`` ``[R, >= m]`` float16, tokens contiguous."""
    rows, g, d = queries.shape
    if queries.device.type != "cpu":
        raise ValueError(f"CPU tensors only, got {queries.device} and {keys.device}")
    if g == 0 or d == 0:
        raise ValueError(f"queries {tuple(queries.shape)}: no query heads or no dimensions to score with")
    if queries.dtype != torch.float32:
        raise TypeError(f"float32 queries and float32, bfloat16 or int8 keys only, got {queries.dtype} and {keys.dtype}")
    _check_keys(rows, d, keys, scales)


def _check_keys(rows: int, d: int, keys: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Keys ``[rows, d, m]`` float32, bfloat16 or int8 CPU with tokens contiguous; int8 keys (only they)
    with their ``scales`` ``[rows, >= m]`` float16, tokens contiguous."""
    if keys.device.type != "cpu":
        raise ValueError(f"CPU tensors only, got keys on {keys.device}")
    if keys.dim() != 3 or keys.shape[0] != rows or keys.shape[1] != d or keys.stride(2) != 1:
        raise ValueError(f"keys {tuple(keys.shape)} strides {keys.stride()} do not match queries "
                         f"[{rows}, g, {d}] with tokens contiguous")
    if keys.dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise TypeError(f"float32 queries and float32, bfloat16 or int8 keys only, got keys {keys.dtype}")
    if (keys.dtype == torch.int8) != (scales is not None):
        raise TypeError("int8 keys need their scales, and only int8 keys have scales")
    if scales is not None and (scales.device.type != "cpu" or scales.dtype != torch.float16 or scales.dim() != 2
                               or scales.shape[0] != rows or scales.shape[1] < keys.shape[2]
                               or (scales.shape[1] > 1 and scales.stride(1) != 1)):
        raise ValueError(f"scales {scales.dtype} {tuple(scales.shape)} strides {scales.stride()} on {scales.device} are "
                         f"not [{rows}, >= {keys.shape[2]}] float16 CPU with tokens contiguous")


def _check_tables(rows: int, slot_pos: np.ndarray, slot_of: np.ndarray, active: np.ndarray) -> None:
    """A residency map's tables as the kernels read them: ``rows`` rows each, contiguous within a row, rows
    apart by at least their length (the kernels write every row; rows closer than that would overlap). The
    kernels take a slot_of row's length apart from its stride (the update's map of positions has one entry
    per element of a row, the last for padding)."""
    arrays = {"slot_pos": (slot_pos, np.int64), "slot_of": (slot_of, np.int32), "active": (active, np.bool_)}
    for name, (array, dtype) in arrays.items():
        contiguous = array.shape[1] <= 1 or array.strides[1] == array.itemsize
        apart = array.shape[0] <= 1 or array.strides[0] >= array.shape[1] * array.itemsize
        if array.dtype != dtype or array.shape[0] != rows or not contiguous or not apart:
            raise ValueError(f"{name}: {array.dtype} {array.shape} strides {array.strides} is not [{rows}, *] "
                             f"{np.dtype(dtype)} with contiguous rows apart by their length")


def _page_tensors(pages: "PageRows | None") -> tuple:
    """The tensors a prefilter's call reads: bounds, blocks, block scales, int8 bound blocks and their scales."""
    if pages is None:
        return (None,) * 5
    return pages.bounds, pages.blocks, pages.block_scales, pages.bound_blocks, pages.bound_scales


def _check_pages(rows: int, d: int, capacity: int, dtype: torch.dtype, pages: "PageRows") -> None:
    """Page bounds ``[rows, 2 d, >= ceil(capacity / page)]`` float32 CPU with pages contiguous, and blocks
    ``[rows, >= pages, d, page]`` of the keys' ``dtype`` (int8: ``[rows, >= pages, d / 4, page, 4]`` with block
    scales ``[rows, >= pages, page]`` float16), each row contiguous."""
    bounds, blocks, scales, page = pages.bounds, pages.blocks, pages.block_scales, pages.prefilter.page
    count = -(-capacity // page)
    if (bounds.device.type != "cpu" or bounds.dtype != torch.float32 or bounds.dim() != 3 or bounds.shape[0] != rows
            or bounds.shape[1] != 2 * d or bounds.shape[2] < count or bounds.stride(2) != 1):
        raise ValueError(f"page bounds {bounds.dtype} {tuple(bounds.shape)} strides {bounds.stride()} on "
                         f"{bounds.device} are not [{rows}, {2 * d}, >= {count}] float32 CPU with pages contiguous")
    block = (d // 4, page, 4) if dtype == torch.int8 else (d, page)
    if (blocks.device.type != "cpu" or blocks.dtype != dtype or blocks.shape[0] != rows or blocks.shape[1] < count
            or tuple(blocks.shape[2:]) != block or (dtype == torch.int8 and d % 4) or not blocks[0].is_contiguous()):
        raise ValueError(f"page blocks {blocks.dtype} {tuple(blocks.shape)} on {blocks.device} are not "
                         f"[{rows}, >= {count}, {', '.join(map(str, block))}] {dtype} CPU, each row contiguous")
    if (dtype == torch.int8) != (scales is not None) or (scales is not None and (
            scales.device.type != "cpu" or scales.dtype != torch.float16 or scales.dim() != 3
            or scales.shape[0] != rows or scales.shape[1] < count or scales.shape[2] != page
            or not scales[0].is_contiguous())):
        raise ValueError(f"page blocks of {dtype} keys need float16 block scales [{rows}, >= {count}, {page}] "
                         "exactly when the keys are int8")
    groups = -(-count // 16)
    codes, code_scales = pages.bound_blocks, pages.bound_scales
    if (codes is None) != (code_scales is None) or (codes is not None and (
            dtype != torch.int8 or codes.dtype != torch.int8 or codes.device.type != "cpu" or codes.shape[0] != rows
            or codes.shape[1] < groups or tuple(codes.shape[2:]) != (2 * d // 4, 16, 4) or not codes[0].is_contiguous()
            or code_scales.dtype != torch.float16 or code_scales.device.type != "cpu" or code_scales.dim() != 2
            or code_scales.shape[0] != rows or code_scales.shape[1] < 16 * groups or code_scales.stride(1) != 1)):
        raise ValueError(f"int8 page bounds are int8 codes [{rows}, >= {groups}, {2 * d // 4}, 16, 4] with float16 "
                         f"scales [{rows}, >= {16 * groups}], given with int8 keys only")


def _layout(*tensors: torch.Tensor | None) -> tuple:
    """What a bound call reads of its tensors: each one's memory, shape, strides, type and device (None for
    an absent one). Equal layouts of held tensors are the very memory bound (it cannot be another's)."""
    return tuple(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device.type) for t in tensors)


def _row_stride(table: np.ndarray) -> int:
    """A checked table's row stride in elements (0 for a one-row table made by ``[None]``: its one row is
    addressed alike; the kernels size a row by ``slot_of``'s length, passed apart)."""
    return table.strides[0] // table.itemsize


_source()  # read now, with the wrappers above (see ABI)
