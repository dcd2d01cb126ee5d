"""A GGUF model's weights read at decode time from the file's q4_1 / q8_0 blocks (gguf_weights, native's
``tbrun_linear`` formats): the same sums, bit for bit, as from the float32 weights they widen to."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from offload_engine import native
from offload_engine.gguf_weights import (AttachedBlocks, _reverse_permute, attach_gguf_blocks, block_tensors,
                                         gguf_file_of, widen)

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None,
    reason="no C++ compiler on PATH: the native kernel cannot be built here (the float32 path is tested elsewhere)",
)
TYPES = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}


def _kernels():
    kernels = native.kernels()
    if kernels is None:
        pytest.skip(f"the native kernels cannot be built here: {native.status()}")
    return kernels


def _quantized(rows: int, cols: int, block_format: str, seed: int) -> np.ndarray:
    """Blocks of a random matrix ``[rows, cols]`` as llama.cpp's quantiser writes them (gguf-py's reference)."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return quants.quantize(values, TYPES[block_format])


def _attached(rows: int, cols: int, block_format: str, seed: int = 0) -> torch.Tensor:
    raw = _quantized(rows, cols, block_format, seed)
    weight = torch.from_numpy(quants.dequantize(raw, TYPES[block_format]).astype(np.float32))
    native.attach_weight_blocks(weight, native.WeightBlocks(block_format, torch.from_numpy(raw.copy())))
    return weight


@pytest.mark.parametrize("block_format", ["q4_1", "q8_0"])
def test_widen_is_ggufs_dequantisation(block_format):
    raw = _quantized(37, 96, block_format, seed=3)
    expected = quants.dequantize(raw, TYPES[block_format])
    assert np.array_equal(widen(torch.from_numpy(raw), block_format).numpy(), expected)


@pytest.mark.parametrize("block_format", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows, cols, threads", [(1, 32, 1), (37, 96, 1), (300, 576, 1), (2048, 2048, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_linear_from_blocks_is_the_float32_linear_bit_for_bit(block_format, rows, cols, threads, bias, monkeypatch):
    """The kernel widens each block to the float32 weights and sums in matvec's order: the same numbers as from
    the dequantised matrix (2048 x 2048 is above the threaded size: rows split between two threads)."""
    kernels = _kernels()
    monkeypatch.setenv(native.THREADS_VARIABLE, str(threads))
    weight = _attached(rows, cols, block_format)
    generator = torch.Generator().manual_seed(1)
    x, b = torch.randn(1, 1, cols, generator=generator), torch.randn(rows, generator=generator) if bias else None
    assert native.weight_form(weight)[1] == native.WEIGHT_FORMATS.index(block_format)
    from_blocks = kernels.linear(x, weight, b)
    assert native.weight_form(weight.clone())[1] == 0  # a copy has no blocks: float32
    from_floats = kernels.linear(x, weight.clone(), b)
    assert torch.equal(from_blocks, from_floats)
    wide_b = None if b is None else b.double()
    exact = torch.nn.functional.linear(x.double(), weight.double(), wide_b)
    magnitude = torch.nn.functional.linear(x.double().abs(), weight.double().abs(), None if b is None else wide_b.abs())
    assert ((from_blocks.double() - exact).abs() <= 1e-6 * magnitude + 1e-7).all()  # float32 rounding of a sum


@pytest.mark.parametrize("block_format", ["float32", "q4_1"])
def test_split_linears_give_the_one_thread_result_called_back_to_back_and_after_the_workers_sleep(
        block_format, monkeypatch):
    """A decode's projections split between threads (the smallest the embedded model has, 192 x 576, is above
    the threaded size): every call gives the one-thread product bit for bit, whether the kept worker is still
    spinning from the call before or has gone to sleep (its spin is 200 µs)."""
    import time

    kernels = _kernels()
    generator = torch.Generator().manual_seed(5)
    if block_format == "float32":
        weights = [torch.randn(rows, 576, generator=generator) for rows in (192, 576, 1536)]
    else:
        weights = [_attached(rows, 576, block_format) for rows in (192, 576, 1536)]
    xs = [torch.randn(1, 1, 576, generator=generator) for _ in range(4)]
    monkeypatch.setenv(native.THREADS_VARIABLE, "1")
    expected = [[kernels.linear(x, w, None) for w in weights] for x in xs]
    monkeypatch.setenv(native.THREADS_VARIABLE, "2")
    for round_ in range(60):
        for x, rows in zip(xs, expected):
            for w, one in zip(weights, rows):
                assert torch.equal(kernels.linear(x, w, None), one)
        if round_ % 10 == 9:
            time.sleep(0.002)  # past the spin: the worker sleeps and is woken by the next call


def test_the_kernel_reads_the_blocks_not_the_floats():
    """Blocks attached to a weight they do not widen to (the caller's check skipped on purpose) give their own
    product: the kernel reads them, not the float32 weight."""
    kernels = _kernels()
    raw = _quantized(16, 64, "q4_1", seed=5)
    weight = torch.randn(16, 64)
    native.attach_weight_blocks(weight, native.WeightBlocks("q4_1", torch.from_numpy(raw.copy())))
    x = torch.randn(64)
    torch.testing.assert_close(kernels.linear(x, weight, None), widen(torch.from_numpy(raw), "q4_1") @ x,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_format", ["q4_1", "q8_0"])
def test_a_gated_mlp_from_blocks_is_the_float32_mlp_bit_for_bit(block_format):
    kernels = _kernels()
    gate, up, down = (_attached(128, 64, block_format, 1), _attached(128, 64, block_format, 2),
                      _attached(64, 128, block_format, 3))
    x, residual = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    got = kernels.gated_mlp(x, gate, up, down, "silu", residual)
    expected = kernels.gated_mlp(x, gate.clone(), up.clone(), down.clone(), "silu", residual)
    assert torch.equal(got, expected)


def test_blocks_stop_standing_for_a_weight_changed_moved_or_cast():
    """An in-place update (its version), a new memory (``.data =``) or a cast leaves the blocks stale: the weight's
    float32 values are read again, and the product is the new weight's."""
    kernels = _kernels()
    x = torch.randn(64)
    for change in ("in place", "new memory"):
        weight = _attached(32, 64, "q8_0")
        with torch.no_grad():
            if change == "in place":
                weight.mul_(2.0)
            else:
                weight.data = weight.data * 2.0
        assert native.weight_blocks(weight) is None, change
        torch.testing.assert_close(kernels.linear(x, weight, None), weight @ x, rtol=1e-5, atol=1e-5)
    linear = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(_attached(32, 64, "q8_0"))
    raw = _quantized(32, 64, "q8_0", 0)
    native.attach_weight_blocks(linear.weight, native.WeightBlocks("q8_0", torch.from_numpy(raw.copy())))
    assert native.weight_blocks(linear.weight) is not None
    linear.to(torch.bfloat16)  # the module's cast replaces the parameter's memory
    assert native.weight_blocks(linear.weight) is None


def test_weight_blocks_are_checked_at_construction():
    with pytest.raises(ValueError, match="format must be one of"):
        native.WeightBlocks("q4_0", torch.zeros(2, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 CPU tensor \[rows, blocks \* 20\]"):
        native.WeightBlocks("q4_1", torch.zeros(2, 21, dtype=torch.uint8))
    blocks = native.WeightBlocks("q4_1", torch.zeros(2, 40, dtype=torch.uint8))
    assert blocks.shape == (2, 64)
    with pytest.raises(ValueError, match="cannot stand for"):
        native.attach_weight_blocks(torch.zeros(2, 32), blocks)


# ---- a tiny Llama written to a GGUF file as llama.cpp's converter writes it ----

def _file_order(model_rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (the inverse of transformers' ``_reverse_permute``)."""
    half = model_rows.shape[0] // heads // 2
    return model_rows.reshape(heads, 2, half, *model_rows.shape[1:]).swapaxes(1, 2).reshape(model_rows.shape)


def _tiny_gguf(tmp_path, seed: int = 0):
    """A tiny Llama whose projections and output head are q4_1 / q8_0 blocks of a GGUF file (q and k rows in the
    file's order), the model's float32 weights their widening (as transformers' loader gives them)."""
    from tiny_models import tiny_model

    model = tiny_model("llama", initializer_range=0.2)
    config = model.config
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list([f"token {i}" for i in range(config.vocab_size)])  # a string array the index skips
    writer.add_token_scores([0.0] * config.vocab_size)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    generator = np.random.default_rng(seed)
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            writer.add_tensor(f"blk.{layer}.attn_norm.weight", block.input_layernorm.weight.numpy())
            for gguf_name, path_in_model in names.items():
                linear = block.get_submodule(path_in_model)
                block_format = "q8_0" if gguf_name == "attn_v" else "q4_1"
                raw = _quantized(*linear.weight.shape, block_format, int(generator.integers(1 << 30)))
                heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name)
                model_rows = raw if heads is None else _reverse_permute(raw, heads)
                linear.weight.copy_(widen(torch.from_numpy(np.ascontiguousarray(model_rows)), block_format))
                stored = raw if heads is None else _file_order(model_rows, heads)
                assert np.array_equal(stored, raw)
                writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", raw, raw_dtype=TYPES[block_format])
        head = _quantized(config.vocab_size, config.hidden_size, "q8_0", int(generator.integers(1 << 30)))
        model.lm_head.weight.copy_(widen(torch.from_numpy(head), "q8_0"))
        writer.add_tensor("output.weight", head, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def test_the_index_reader_finds_what_ggufs_reader_finds(tmp_path):
    _, path = _tiny_gguf(tmp_path)
    found = block_tensors(path)
    reference = {t.name: np.asarray(t.data) for t in GGUFReader(str(path)).tensors
                 if t.tensor_type.name in ("Q4_1", "Q8_0")}
    assert sorted(name for name, _, _ in found) == sorted(reference)
    for name, block_format, rows in found:
        assert block_format == ("q8_0" if "attn_v" in name or name == "output.weight" else "q4_1")
        assert np.array_equal(rows, reference[name]), name
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        block_tensors(tmp_path / "not.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:2000])  # inside the index: refused, not misread
    with pytest.raises(ValueError, match="ends inside its GGUF index"):
        block_tensors(tmp_path / "cut.gguf")


def test_an_unreadable_index_attaches_nothing_and_says_why(tmp_path):
    model, path = _tiny_gguf(tmp_path)
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:2000])
    attached = attach_gguf_blocks(model, tmp_path / "cut.gguf")
    assert attached.matrices == 0 and "could not be read" in attached.describe()
    assert all(native.weight_blocks(p) is None for p in model.parameters())


def test_a_gguf_models_decode_reads_the_blocks_and_keeps_its_logits_bit_for_bit(tmp_path):
    """Every projection (q and k through transformers' row order) and the output head attach; the bound decoder
    layers read them (their formats say so); a decode's logits equal the float32 model's exactly."""
    from offload_engine import Engine, EngineConfig, KVMode
    from offload_engine.models import ModelAdapter

    _kernels()
    model, path = _tiny_gguf(tmp_path)
    plain = copy.deepcopy(model)  # the same float32 weights, no blocks
    attached = attach_gguf_blocks(model, path)
    layers = model.config.num_hidden_layers
    assert attached.matrices == 7 * layers + 1 and attached.declined == ()
    assert attached.block_bytes < attached.float_bytes / 3
    prompt = torch.randint(1, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()

    def run(m):
        adapter = ModelAdapter(m)
        engine = Engine(adapter, EngineConfig(context=32, mode=KVMode.DENSE_DEVICE))
        logits = engine.score_continuation(prompt[:6], prompt[6:], keep_logits=True).logits
        return adapter, logits

    adapter, from_blocks = run(model)
    all_floats = sum(p.numel() * 4 for p in model.parameters())
    assert adapter.decode_weight_bytes() == all_floats - attached.float_bytes + attached.block_bytes
    assert all(adapter._bound_layers[i].args.wq_format == native.WEIGHT_FORMATS.index("q4_1")
               and adapter._bound_layers[i].args.wv_format == native.WEIGHT_FORMATS.index("q8_0")
               for i in range(layers))
    plain_adapter, from_floats = run(plain)
    assert all(plain_adapter._bound_layers[i].args.wq_format == 0 for i in range(layers))
    assert torch.equal(from_blocks, from_floats)


def test_a_file_that_is_not_the_models_attaches_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model, _ = _tiny_gguf(tmp_path / "a")
    _, other_path = _tiny_gguf(tmp_path / "b", seed=1)
    attached = attach_gguf_blocks(model, other_path)
    assert attached.matrices == 0 and len(attached.declined) == 7 * model.config.num_hidden_layers + 1
    assert "not the model's weight" in attached.describe()
    assert all(native.weight_blocks(p) is None for p in model.parameters())


def test_the_gguf_file_of_a_source(tmp_path):
    assert gguf_file_of(str(tmp_path), {"gguf_file": "m.gguf"}) == tmp_path / "m.gguf"
    assert gguf_file_of(str(tmp_path), {}) is None
    (tmp_path / "tbrun_source.json").write_text('{"gguf": "/nowhere/m.gguf"}')
    assert gguf_file_of(str(tmp_path), {}) is None  # a recorded file that is gone: the float32 weights
    real = tmp_path / "m.gguf"
    real.write_bytes(b"")
    (tmp_path / "tbrun_source.json").write_text(f'{{"gguf": "{real}"}}')
    assert gguf_file_of(str(tmp_path), {}) == real


@pytest.mark.slow
def test_the_embedded_model_decodes_from_its_files_blocks_with_the_same_logits(monkeypatch):
    """The embedded SmolLM2's 210 projections (q4_1) and its tied output head (q8_0) attach on load; a decode's
    logits equal those of the model loaded with ``TBRUN_GGUF_BLOCKS=0`` bit for bit."""
    from offload_engine import Engine, EngineConfig, KVMode, load_model

    _kernels()
    adapter = load_model(None)
    assert isinstance(adapter.weight_blocks, AttachedBlocks)
    assert adapter.weight_blocks.matrices == 7 * adapter.dims.num_layers + 1 and not adapter.weight_blocks.declined
    monkeypatch.setenv("TBRUN_GGUF_BLOCKS", "0")
    plain = load_model(None)
    assert plain.weight_blocks is None
    prompt = adapter.tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")

    def logits(a):
        engine = Engine(a, EngineConfig(context=64, mode=KVMode.DENSE_DEVICE))
        return engine.score_continuation(prompt[:8], prompt[8:], keep_logits=True).logits

    assert torch.equal(logits(adapter), logits(plain))


@pytest.mark.slow
def test_generate_names_the_blocks_it_decoded_from(monkeypatch):
    """``tbrun generate`` on the embedded model says a step read the file's blocks, and says nothing of them with
    ``TBRUN_GGUF_BLOCKS=0``."""
    from typer.testing import CliRunner

    from tbrun_cli.main import app

    _kernels()
    args = ["generate", "--prompt", "Hello.", "--no-chat", "--max-new-tokens", "2"]
    shown = " ".join(CliRunner().invoke(app, args).output.split())
    assert "weights (decode)" in shown and "211 matrices from the GGUF file's q4_1 / q8_0 blocks" in shown
    monkeypatch.setenv("TBRUN_GGUF_BLOCKS", "0")
    assert "weights (decode)" not in CliRunner().invoke(app, args).output
