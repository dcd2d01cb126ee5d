"""``tbrun eval``: quality of every policy at every budget on a generated task, as a report."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from offload_engine.config import DEFAULT_WINDOW, Budget
from offload_engine.evaluation.tasks import TASKS

from .common import console, err_console, user_errors

if TYPE_CHECKING:
    from offload_engine.evaluation.harness import EvalConfig

DEFAULT_BUDGETS = "5%,10%,25%,50%"


def register(app: typer.Typer) -> None:
    app.command("eval")(user_errors(eval_command))


def eval_command(
    ctx: typer.Context,
    task: str = typer.Option(..., "--task", "-t", help=f"One of: {', '.join(TASKS)}."),
    policy: str = typer.Option(..., "--policy", help="Comma-separated policies, e.g. quest,snapkv,critical(quest); "
                               "settings per policy in brackets: 'tokenbutler[interval=4,neighbor_rule=runs]' "
                               "(sinks, window, interval, neighbors, neighbor_rule, refresh_layers as 14-23 or 3+20-23, keep_bonus: a share, group_reduction, "
                               "key_dtype: auto, float32, bfloat16 or int8, page_prefilter: a page size or 0, prefilter_factor)."),
    budget: str = typer.Option(DEFAULT_BUDGETS, "--budget", help="Comma-separated budgets: shares (10%) or tokens."),
    context: str = typer.Option("4k", "--context", "-c", help="Tokens per sample, answer included: 1k, 4k, 8k."),
    samples: int = typer.Option(8, "--samples", "-n", help="Samples per policy and budget."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Hub id or local path; default: the embedded SmolLM2-135M-Instruct."),
    predictor: Optional[str] = typer.Option(None, "--predictor", help="TokenButler checkpoint directory."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated samples."),
    sinks: int = typer.Option(4, "--sinks", help="First tokens always attended."),
    window: int = typer.Option(DEFAULT_WINDOW, "--window", help="Widest local window (half the budget after the "
                                "sinks, at least 16, at most this)."),
    interval: int = typer.Option(1, "--interval", help="Predict every N steps, reuse the selection between."),
    neighbors: int = typer.Option(0, "--neighbors", help="Also fetch this many positions after each selected one."),
    neighbor_rule: str = typer.Option("radius", "--neighbor-rule",
                                      help="radius (--neighbors after each selected) or runs (each run of c selected "
                                      "extended by c)."),
    group_reduction: str = typer.Option("mean", "--group-reduction",
                                        help="tokenbutler's GQA rule: mean (of the group's probabilities) or max."),
    shared_prefill: bool = typer.Option(True, "--shared-prefill/--separate-prefill",
                                        help="Prefill each sample once for every point (default), or once per point."),
    ppl_prefix: Optional[int] = typer.Option(None, "--ppl-prefix",
                                             help="ppl tasks: score the tokens from this one on (default: the "
                                             "shortest prompt at which every budget covers sinks and window)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: fp32 on CPU, bf16 on CUDA)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different run already in --out."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes",
                                                help="Start no sample after this many minutes (above 0; the first "
                                                "sample always runs); report the samples done (partial) and keep "
                                                "the progress, so the same command finishes it."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (results.json, report.md, plot.png)."),
) -> None:
    """Evaluate policies x budgets on a task through the engine; write JSON, Markdown and a plot."""
    from offload_engine.evaluation.harness import EvalConfig, check_max_minutes, split_policies
    from offload_engine.evaluation.report import MARKDOWN_FILE, main_table

    check_max_minutes(max_minutes)
    config = EvalConfig(
        task=task, policies=split_policies(policy), budgets=[Budget.parse(b) for b in budget.split(",") if b.strip()],
        context=context, samples=samples, seed=seed, model=model, predictor=predictor, device=device,
        dtype=dtype or ("fp32" if device == "cpu" else "bf16"), sinks=sinks, window=window,
        interval=interval, neighbors=neighbors, neighbor_rule=neighbor_rule, group_reduction=group_reduction,
        shared_prefill=shared_prefill, ppl_prefix=ppl_prefix,
    )
    command = _command_line(ctx)
    report = _run_with_progress(config, out, overwrite, command, max_minutes)
    console.print("\n".join(main_table(report)), markup=False)
    partial = report.get("partial")
    done = f"; partial: {partial['samples_done']} of {config.samples} samples" if partial else ""
    console.print(f"report: {out / MARKDOWN_FILE} ({report['seconds']:.0f} s{done})")


def _command_line(ctx: typer.Context) -> str:
    """``tbrun eval`` with every option as resolved (defaults included), so the run can be repeated.

    Paths are written relative to the repository when inside it (reports name no local path);
    ``--max-minutes`` is left out (it does not change results: the command finishes a partial run)."""
    from offload_engine.machine import portable_path

    words = ["tbrun", "eval"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or param.name == "max_minutes":
            continue
        if param.secondary_opts:  # a --x/--y switch
            words.append(param.opts[0] if value else param.secondary_opts[0])
            continue
        if value is False:
            continue
        flag = max(param.opts, key=len)
        text = portable_path(value) if isinstance(value, Path) or param.name in ("predictor", "model") else str(value)
        words += [flag] if value is True else [flag, text]
    return shlex.join(words)


def _run_with_progress(config: EvalConfig, out: Path, overwrite: bool, command: str,
                       max_minutes: float | None = None) -> dict:
    """``run_eval`` under a rich progress bar over the (run point, sample) pairs (a resumed run starts
    where the interrupted one stopped)."""
    from offload_engine.evaluation.harness import RunPoint, run_eval

    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as progress:
        bar = progress.add_task("loading the model", total=None)

        def on_ready(total: int, done: int) -> None:
            progress.update(bar, total=total, completed=done, description="starting")
            if done:
                progress.console.print(f"resuming: {done} of {total} (point, sample) runs already in {out}")
            progress.reset(bar, total=total, completed=done, description="starting")  # no time for old work

        def on_status(text: str) -> None:
            progress.update(bar, description=text)

        def on_sample(point: RunPoint, record: dict) -> None:
            progress.update(bar, advance=1)

        return run_eval(config, out, overwrite, command, on_sample=on_sample, on_ready=on_ready, on_status=on_status,
                        max_minutes=max_minutes)