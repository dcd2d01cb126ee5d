"""``tbrun generate`` and ``tbrun info`` through typer's test runner, bad input included."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbrun_cli.main import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def flat(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


def generate(model_dir: str, *extra: str):
    return run("generate", "--model", model_dir, "--prompt", "The quick brown fox jumps over the lazy dog. " * 3, "--no-chat",
               "--max-new-tokens", "5", "--context", "256", *extra)


@pytest.mark.parametrize("extra", [
    (),
    ("--offload",),
    ("--offload", "--policy", "streaming", "--budget", "40", "--sinks", "2", "--window", "8"),
    ("--offload", "--policy", "streaming", "--budget", "50%", "--sinks", "1", "--window", "2"),
])
def test_generate_writes_text_and_summary(tiny_model_dir, tmp_path, extra):
    stats_file = tmp_path / "stats.json"
    result = generate(tiny_model_dir, "--stats-json", str(stats_file), *extra)
    assert result.exit_code == 0, result.output
    assert "ms/step" in result.output and "prefill" in result.output
    stats = json.loads(stats_file.read_text())
    assert stats["new_tokens"] >= 1 and stats["prompt_tokens"] > 0
    assert len(stats["decode_ms"]) == stats["new_tokens"] - 1 or stats["new_tokens"] == 1
    if "--offload" in extra:
        assert stats["mode"] in ("dense-offload", "sparse-offload")


def test_a_share_budget_below_sinks_and_window_on_a_short_prompt_runs_and_says_so(tiny_model_dir):
    result = generate(tiny_model_dir, "--offload", "--policy", "quest", "--budget", "5%", "--sinks", "4",
                      "--window", "64")
    assert result.exit_code == 0, result.output
    assert "below --sinks + the narrowest window" in flat(result.output)


def test_the_summary_says_what_the_budget_came_to_at_the_last_step(tiny_model_dir):
    """Sinks, the window that follows the budget and the selected rest, at the last step's length."""
    from tbrun_cli.generate_cmd import _budget_row

    from offload_engine.config import Budget, EngineConfig, KVMode, SelectionConfig

    result = generate(tiny_model_dir, "--offload", "--policy", "quest", "--budget", "90%", "--sinks", "4",
                      "--window", "64", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "budget (last step)" in result.output and "selected" in result.output
    selection = SelectionConfig(policy="quest", budget=Budget.parse("10%"), sinks=4, window=128)
    config = EngineConfig(context=4096, mode=KVMode.SPARSE_OFFLOAD, selection=selection)
    assert _budget_row(config, 2142) == ("budget (last step)", "10% = 215 of 2,142 tokens per layer and KV head: "
                                         "sinks 4, window 105, 106 selected")
    assert _budget_row(config, 3000)[1].endswith("window 128, 168 selected")  # 300 = 4 + 128 + 168
    assert _budget_row(config, 100)[1] == "10% = 20 of 100 tokens per layer and KV head: sinks 4, window 16, 0 selected"
    covering = SelectionConfig(policy="quest", budget=Budget(tokens=2048), sinks=4, window=128)
    row = _budget_row(EngineConfig(context=4096, mode=KVMode.SPARSE_OFFLOAD, selection=covering), 34)
    assert row[1] == "34 of 34 tokens: every token (the budget covers the sequence)"
    assert _budget_row(EngineConfig(context=4096, selection=selection), 2142) is None  # dense-device selects nothing


def test_help_version_and_refused_options_answer_without_loading_torch():
    """``tbrun --help``, every command's ``--help``, ``--version`` and an option refused while parsing run in a
    fresh process that never imports torch or transformers (they take seconds to load; help should not)."""
    script = """
import sys
from typer.testing import CliRunner
from tbrun_cli.main import app
asks = [["--help"], ["--version"], ["generate", "--help"], ["eval", "--help"], ["info", "--help"],
        ["serve", "--help"], ["train-predictor", "--help"], ["bench", "latency", "--help"],
        ["bench", "gather", "--help"], ["--threads", "2", "generate", "--help"]]
for args in asks:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and result.output.strip(), (args, result.exit_code, result.output)
refused = CliRunner().invoke(app, ["generate", "--sinks", "four"])
assert refused.exit_code == 2 and "'--sinks'" in refused.output, refused.output
print(" ".join(name for name in ("torch", "transformers", "offload_engine.engine") if name in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"


def test_info_reports_machine_and_max_context(tiny_model_dir):
    import torch

    from offload_engine.memory import dtype_name
    from offload_engine.policies.tokenbutler import compact_key_dtype

    result = run("info", "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "max context" in result.output and "pinned memory" in result.output
    for dtype, name in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # what auto stores, as generate would
        result = run("info", "--model", tiny_model_dir, "--dtype", dtype)
        stored = dtype_name(compact_key_dtype("auto", name, torch.device("cpu")))
        assert re.search(rf"tokenbutler's projected keys\s+│ {stored} \(--key-dtype auto", result.output), result.output


@pytest.mark.parametrize("extra, message", [
    (("--context", "lots"), "is not a length"),
    (("--context", "0"), "must be positive"),
    (("--context", "4k"), "longer than the 512 positions"),
    (("--context", "2"), "does not leave room"),
    (("--device", "cuda"), "no CUDA GPU"),
    (("--device", "GPU"), "--device 'GPU' is not cpu, cuda or cuda:N"),
    (("--device", "meta"), "--device 'meta' is not cpu, cuda or cuda:N"),
    (("--offload", "--policy", "streaming", "--budget", "-5"), "at least 1 token"),
    (("--offload", "--policy", "streaming", "--budget", "9999"), "above --context"),
    (("--offload", "--policy", "streaming", "--budget", "150%"), "outside (0, 100%]"),
    (("--offload", "--policy", "streaming", "--budget", "16", "--window", "32"), "exceed the budget"),
    (("--offload", "--policy", "nonsense"), "unknown policy 'nonsense'; valid: dense"),
    (("--offload", "--policy", "critical(dense)", "--budget", "10%"), "attends every token, as dense does"),
    (("--offload", "--policy", "critical(critical(quest))", "--budget", "10%"), "wraps critical in critical"),
    (("--policy", "streaming"), "add --offload"),
    (("--dtype", "int3"), "is not one of"),
    (("--offload", "--policy", "streaming", "--interval", "4", "--refresh-layers", "1,99"), "[99] past the model's last layer"),
    (("--offload", "--policy", "streaming", "--interval", "4", "--refresh-layers", "5-2"), "is not a layer N or a range"),
    (("--offload", "--policy", "streaming", "--refresh-layers", "1"), "add --interval N or drop --refresh-layers"),
    (("--offload", "--policy", "streaming", "--budget", "inf"), "is not a finite number"),
    (("--offload", "--policy", "streaming", "--budget", "nan%"), "is not a finite number"),
    (("--temperature", "nan"), "--temperature must be a finite number >= 0"),
    (("--offload", "--policy", "quest[/x]", "--budget", "10%"), "quest[/x]"),  # printed as text, not rich markup
    (("--stats-json", "/no/such/folder/stats.json"), "the folder /no/such/folder does not exist"),
])
def test_bad_input_is_a_clear_error(tiny_model_dir, extra, message):
    args = ["generate", "--model", tiny_model_dir, "--prompt", "hello there", "--no-chat", "--context", "256"]
    result = run(*args, *extra)
    if extra[0] == "--device" and result.exit_code == 0:
        pytest.fail("--device cuda was accepted on a machine without CUDA")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_missing_model_path_and_unsupported_architecture(tmp_path):
    result = run("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.exit_code == 2 and "does not exist" in flat(result.output)
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = run("generate", "--model", str(tmp_path / "gpt2"), "--prompt", "hi")
    assert result.exit_code == 2 and "'gpt2' is not supported" in flat(result.output)


def test_a_model_folder_without_weights_or_config_is_a_clear_error(tiny_model_dir, tmp_path):
    """A folder with a config but no weights (a half-finished download or copy) and a folder without a config,
    for generate and info: one message and exit code 2, no traceback."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "no-weights")
    result = run("generate", "--model", str(tmp_path / "no-weights"), "--prompt", "hi", "--context", "128")
    assert result.exit_code == 2 and "could not load the weights" in flat(result.output), result.output
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "truncated")  # a download cut short
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("generate", "--model", str(tmp_path / "truncated"), "--prompt", "hi", "--context", "128")
    assert result.exit_code == 2 and "could not load the weights" in flat(result.output), result.output
    (tmp_path / "empty").mkdir()
    for command in (("info",), ("generate", "--prompt", "hi")):
        result = run(*command, "--model", str(tmp_path / "empty"))
        assert result.exit_code == 2 and "could not read the model config" in flat(result.output), result.output
        assert "Traceback" not in result.output


def test_a_predictor_of_another_model_name_is_noted_and_of_another_shape_refused_before_the_weights(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    import dataclasses

    from offload_engine.models import model_dims
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

    dims = model_dims(tiny_model_dir)
    sparse = ("--offload", "--policy", "tokenbutler", "--budget", "40", "--sinks", "2", "--window", "8")
    for name, trained_for in (("other", "Llama-3.2-1B"), ("same", f"someone/{Path(tiny_model_dir).name}")):
        save_checkpoint(tmp_path / name, TokenButlerPredictor(PredictorConfig.for_model(dims, 2, 8, 16)),
                        {"model_name": trained_for})
    result = generate(tiny_model_dir, *sparse, "--predictor", str(tmp_path / "other"))
    assert result.exit_code == 0 and "was trained for Llama-3.2-1B" in flat(result.output), result.output
    result = generate(tiny_model_dir, *sparse, "--predictor", str(tmp_path / "same"))  # the same model by its hub id
    assert result.exit_code == 0 and "was trained for" not in flat(result.output), result.output
    from tbrun_cli.generate_cmd import _check_predictor_model

    save_checkpoint(tmp_path / "for-embedded", TokenButlerPredictor(PredictorConfig.for_model(dims, 2, 8, 16)),
                    {"model_name": "SmolLM2-135M-Instruct"})
    for name in (None, "default", "embedded"):  # every spelling of the embedded model is that model
        _check_predictor_model(tmp_path / "for-embedded", name, dims)
    assert "was trained for" not in capsys.readouterr().err
    _check_predictor_model(tmp_path / "for-embedded", "someone/Other-1B", dims)
    assert "was trained for SmolLM2-135M-Instruct, not someone/Other-1B" in " ".join(capsys.readouterr().err.split())
    # the run's statistics name the predictor that selected, through a wrapper too
    critical = ("--offload", "--policy", "critical(tokenbutler)", "--budget", "40", "--sinks", "2", "--window", "8")
    result = generate(tiny_model_dir, *critical, "--predictor", str(tmp_path / "same"), "--stats-json",
                      str(tmp_path / "stats.json"))
    recorded = json.loads((tmp_path / "stats.json").read_text())["predictor"]
    assert result.exit_code == 0 and recorded.startswith("same (weights ") and len(recorded) == len("same (weights )") + 8
    wider = dataclasses.replace(dims, num_layers=dims.num_layers + 1)
    save_checkpoint(tmp_path / "wider", TokenButlerPredictor(PredictorConfig.for_model(wider, 2, 8, 16)))
    from offload_engine import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded first"))
    result = generate(tiny_model_dir, *sparse, "--predictor", str(tmp_path / "wider"))
    assert result.exit_code == 2 and "was trained for another model" in flat(result.output), result.output


def test_key_dtype_stores_the_projected_keys_as_asked_and_the_summary_says_how(tiny_model_dir, tmp_path, monkeypatch):
    """--key-dtype reaches tokenbutler through a wrapper; the statistics and the summary name what the compact
    cache stored (auto: what compact_key_dtype chooses on this CPU); a wrong value or a policy without a
    compact cache is refused before the weights load."""
    import torch

    from offload_engine.memory import dtype_name
    from offload_engine.models import model_dims
    from offload_engine.policies.tokenbutler import compact_key_dtype
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

    dims = model_dims(tiny_model_dir)
    save_checkpoint(tmp_path / "p", TokenButlerPredictor(PredictorConfig.for_model(dims, 2, 8, 16)))
    critical = ("--offload", "--policy", "critical(tokenbutler)", "--budget", "40", "--sinks", "2", "--window", "8",
                "--predictor", str(tmp_path / "p"), "--stats-json", str(tmp_path / "stats.json"))
    auto = dtype_name(compact_key_dtype("auto", torch.float32, torch.device("cpu")))
    for asked, stored in (("int8", "int8"), ("bfloat16", "bfloat16"), ("float32", "float32"), (None, auto)):
        result = generate(tiny_model_dir, *critical, *(("--key-dtype", asked) if asked else ()))
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "stats.json").read_text())["compact_keys"] == stored
        assert f"projected keys {stored}" in flat(result.output), result.output
    from offload_engine import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded first"))
    result = generate(tiny_model_dir, *critical, "--key-dtype", "int4")
    assert result.exit_code == 2 and "--key-dtype 'int4' is not one of auto, float32" in flat(result.output)
    result = generate(tiny_model_dir, "--offload", "--policy", "quest", "--budget", "40", "--key-dtype", "int8")
    assert result.exit_code == 2 and "--key-dtype is only used by --policy tokenbutler" in flat(result.output)


def test_page_prefilter_reaches_tokenbutler_and_bad_values_are_refused_before_the_weights_load(tiny_model_dir,
                                                                                                 tmp_path, monkeypatch):
    from offload_engine.models import model_dims
    from offload_engine.policies.tokenbutler import TokenButlerPolicy
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor

    save_checkpoint(tmp_path / "p", TokenButlerPredictor(PredictorConfig.for_model(model_dims(tiny_model_dir), 2, 8, 16)))
    built = []
    original = TokenButlerPolicy.bind
    monkeypatch.setattr(TokenButlerPolicy, "bind", lambda self, ctx: built.append(self.prefilter) or original(self, ctx))
    common = ("--offload", "--budget", "40", "--sinks", "2", "--window", "8")
    result = generate(tiny_model_dir, *common, "--policy", "tokenbutler", "--predictor", str(tmp_path / "p"),
                      "--page-prefilter", "16")
    assert result.exit_code == 0, result.output
    assert [p.page for p in built] == [16]
    from offload_engine import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded first"))
    result = generate(tiny_model_dir, *common, "--policy", "tokenbutler", "--page-prefilter", "1")
    assert result.exit_code == 2 and "pages of 1 tokens; give an integer of at least 2" in flat(result.output)
    result = generate(tiny_model_dir, *common, "--policy", "quest", "--page-prefilter", "16")
    assert result.exit_code == 2 and "--page-prefilter is only used by --policy tokenbutler" in flat(result.output)


def test_keep_bonus_reaches_the_selection_and_bad_values_are_refused_before_the_weights_load(tiny_model_dir,
                                                                                               monkeypatch):
    from offload_engine import models
    from offload_engine.selection import planner

    held = []
    original = planner.policy_held_terms
    monkeypatch.setattr(planner, "policy_held_terms", lambda bonus, policy: held.append(original(bonus, policy))
                        or held[-1])
    common = ("--offload", "--budget", "40", "--sinks", "2", "--window", "8", "-n", "3")
    result = generate(tiny_model_dir, *common, "--policy", "quest", "--keep-bonus", "0.25")
    assert result.exit_code == 0, result.output
    assert held and held[0].add == pytest.approx(math.log1p(0.25)) and held[0].mul == 1.0  # quest's logit bounds
    from offload_engine import Budget, EngineConfig, KVMode, SelectionConfig
    from tbrun_cli.generate_cmd import _budget_row

    selection = SelectionConfig(policy="quest", budget=Budget(tokens=40), sinks=2, window=8, keep_bonus=0.25)
    row = _budget_row(EngineConfig(context=256, mode=KVMode.SPARSE_OFFLOAD, selection=selection), 200)
    assert row[1].endswith("sinks 2, window 8, 30 selected, keep bonus 0.25")  # the summary says it ran with one
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the weights were loaded first"))
    result = generate(tiny_model_dir, *common, "--policy", "quest", "--keep-bonus", "-1")
    assert result.exit_code == 2 and "--keep-bonus must be a share in [0, 100]" in flat(result.output)
    result = generate(tiny_model_dir, "--keep-bonus", "0.25")
    assert result.exit_code == 2 and "--keep-bonus shapes which tokens a sparse --policy fetches" in flat(result.output)
    result = generate(tiny_model_dir, *common, "--policy", "tokenbutler", "--page-prefilter", "16", "--keep-bonus", "1")
    assert result.exit_code == 2 and "does not combine with tokenbutler's page prefilter" in flat(result.output)


def test_a_hub_id_neither_cached_nor_reachable_fails_at_once(monkeypatch):
    """No network: one message before the hub client's retries (about 30 s of warnings); a cached id or a hub
    host that resolves goes on to transformers as before."""
    import socket

    from offload_engine import models
    from offload_engine.errors import ModelLoadError

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(ModelLoadError, match="not in the local hub cache and the hub .* cannot be reached"):
        models.resolve_model_path("someone/not-cached")
    result = run("info", "--model", "someone/not-cached")
    assert result.exit_code == 2 and "hf download someone/not-cached --local-dir DIR" in flat(result.output)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy resolves the hub, not this machine
    assert models.resolve_model_path("someone/not-cached") == "someone/not-cached"
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    assert models.resolve_model_path("someone/not-cached") == "someone/not-cached"


def test_serve_says_a_bad_host_is_the_host(monkeypatch):
    import socket

    from offload_engine.errors import ConfigError
    from tbrun_cli.serve_cmd import check_port_free

    def refuse(self, address):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(ConfigError, match="--host 'no-such-host' does not resolve"):
        check_port_free("no-such-host", 8080)

    def elsewhere(self, address):
        raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    import errno

    monkeypatch.setattr(socket.socket, "bind", elsewhere)
    with pytest.raises(ConfigError, match="--host '192.0.2.1' is not an address of this machine"):
        check_port_free("192.0.2.1", 8080)


def test_not_enough_host_memory_is_refused_with_numbers(tiny_model_dir, monkeypatch):
    import offload_engine.memory as memory

    fake = namedtuple("vm", "available total")(available=600 * 2**20, total=2**30)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: fake)
    # 600 MiB hold a few hundred thousand tokens of the tiny model; ask for more
    result = run("generate", "--model", tiny_model_dir, "--prompt", "hi", "--offload", "--context", "1m",
                 "--allow-rope-scaling")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "GiB of host memory" in text and "can hold" in text


def test_prompt_file_and_missing_prompt(tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox")
    result = run("generate", "--model", tiny_model_dir, "--prompt-file", str(prompt), "--no-chat",
                 "--context", "128", "-n", "3")
    assert result.exit_code == 0, result.output
    result = run("generate", "--model", tiny_model_dir, "--context", "128")
    assert result.exit_code == 2 and "no prompt" in flat(result.output)


def test_interval_4_and_a_short_context_take_the_predictors_trained_for_them_when_none_is_given(tmp_path, monkeypatch):
    """A model whose name has a shipped predictor trained with --lookahead 4: `--interval 4` without
    --predictor loads that one and says so; interval 1 loads the default one; an explicit --predictor
    wins; a missing interval folder falls back to the default. A short --context at interval 1 loads the
    short-context predictor once it is shipped, and says so; --interval 4 keeps its own."""
    from offload_engine.predictor.checkpoint import save_checkpoint
    from offload_engine.predictor.network import PredictorConfig, TokenButlerPredictor
    from offload_engine.models import ModelAdapter
    from tiny_models import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "models" / "SmolLM2-135M-Instruct"  # the name the shipped predictors are keyed by
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    shipped = tmp_path / "predictors"
    shape = PredictorConfig.for_model(ModelAdapter(model).dims, producer_every=2, dim=8, hidden=16)
    save_checkpoint(shipped / "smollm2-135m-instruct", TokenButlerPredictor(shape))
    monkeypatch.setenv("TBRUN_PREDICTORS", str(shipped))
    loads = []
    from offload_engine.policies import tokenbutler
    original = tokenbutler.load_checkpoint
    monkeypatch.setattr(tokenbutler, "load_checkpoint", lambda path, *a: loads.append(Path(path).name) or original(path, *a))
    sparse = ("--offload", "--policy", "tokenbutler", "--budget", "40", "--sinks", "2", "--window", "8")

    result = generate(str(model_dir), *sparse, "--interval", "4")
    assert result.exit_code == 0, result.output
    assert loads == ["smollm2-135m-instruct"] and "trained for it" not in result.output  # no interval folder yet

    save_checkpoint(shipped / "smollm2-135m-instruct-interval4", TokenButlerPredictor(shape))
    result = generate(str(model_dir), *sparse, "--interval", "4")
    assert result.exit_code == 0, result.output
    assert loads[-1] == "smollm2-135m-instruct-interval4"
    assert "--interval 4: using the predictor trained for it, smollm2-135m-instruct-interval4" in flat(result.output)
    assert generate(str(model_dir), *sparse, "--interval", "1").exit_code == 0 and loads[-1] == "smollm2-135m-instruct"
    assert generate(str(model_dir), *sparse, "--interval", "2").exit_code == 0 and loads[-1] == "smollm2-135m-instruct"
    explicit = generate(str(model_dir), *sparse, "--interval", "4", "--predictor", str(shipped / "smollm2-135m-instruct"))
    assert explicit.exit_code == 0 and loads[-1] == "smollm2-135m-instruct"

    # a short --context takes the predictor fine-tuned for short contexts at interval 1 (and says so)
    from offload_engine.policies.tokenbutler import SHIPPED_FOR_SHORT_CONTEXT, SHORT_CONTEXT_TOKENS
    _, short = SHIPPED_FOR_SHORT_CONTEXT["smollm2-135m-instruct"]
    save_checkpoint(shipped / short, TokenButlerPredictor(shape))
    result = generate(str(model_dir), *sparse, "--context", "256")
    assert result.exit_code == 0, result.output
    assert loads[-1] == short and f"a context of 256 tokens: using the predictor trained for it, {short}" in flat(result.output)
    assert f"{short} (weights " in flat(result.output)  # the summary names the one that selected
    result = generate(str(model_dir), *sparse, "--context", "256", "--interval", "4")
    assert result.exit_code == 0 and loads[-1] == "smollm2-135m-instruct-interval4"
    explicit = generate(str(model_dir), *sparse, "--context", "256", "--predictor", str(shipped / "smollm2-135m-instruct"))
    assert explicit.exit_code == 0 and loads[-1] == "smollm2-135m-instruct" and "trained for it" not in explicit.output
    longer = generate(str(model_dir), *sparse, "--context", str(SHORT_CONTEXT_TOKENS + 1), "--allow-rope-scaling")
    assert longer.exit_code == 0 and loads[-1] == "smollm2-135m-instruct", longer.output


def test_stats_json_on_a_folder_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import offload_engine.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = run("generate", "--model", tiny_model_dir, "--prompt", "hi", "--stats-json", str(tmp_path))
    assert result.exit_code == 2 and "is a folder" in flat(result.output), result.output


def test_a_truncated_gguf_file_is_named_in_a_clear_error(tmp_path):
    from offload_engine.models import embedded_gguf_path

    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(embedded_gguf_path().read_bytes()[:100_000])
    result = run("info", "--model", str(truncated))
    assert result.exit_code == 2, result.output
    assert "could not read the GGUF file" in flat(result.output) and "model.gguf" in flat(result.output)
    assert "Traceback" not in result.output


def test_serve_refuses_an_unknown_log_level_before_loading_the_model(monkeypatch):
    import offload_engine.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = run("serve", "--log-level", "loud", "--port", "0")
    assert result.exit_code == 2 and "--log-level 'loud' is not one of" in flat(result.output), result.output


def test_an_unwritable_model_cache_is_refused_before_converting(tmp_path, monkeypatch):
    from offload_engine.errors import ModelLoadError
    from offload_engine.models import embedded_model_dir

    afile = tmp_path / "a-file"
    afile.write_text("")
    monkeypatch.setenv("TBRUN_CACHE", str(afile / "cache"))
    with pytest.raises(ModelLoadError, match=r"cannot write the converted embedded model .* set \$TBRUN_CACHE"):
        embedded_model_dir(progress=lambda message: pytest.fail(f"the conversion started: {message}"))


@pytest.mark.parametrize("make, message", [
    (lambda tmp: ["--prompt-file", str(tmp)], "is a folder: give a text file"),
    (lambda tmp: ["--prompt-file", str(tmp / "missing.txt")], "does not exist"),
    (lambda tmp: (tmp / "b.bin").write_bytes(b"\x00\xff\xfe\x80") and ["--prompt-file", str(tmp / "b.bin")],
     "is not UTF-8 text"),
    (lambda tmp: ["--prompt", "  \n"], "the prompt is empty"),
])
def test_a_prompt_that_is_no_text_is_refused_before_the_model_loads(tmp_path, monkeypatch, make, message):
    import offload_engine.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    result = run("generate", *make(tmp_path))
    assert result.exit_code == 2 and message in flat(result.output), result.output
