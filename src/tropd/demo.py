"""`tropd demo`: the paper's experiment at CPU scale, in one command.

A `chain` teacher and, for each cell of `tropd.recipes.mismatch` (the `none` control and
`strong` mismatch by default), a smaller student with a capability gap (a carry/borrow
slip) and that cell's style mismatch are built on first use and cached. For each cell
the demo measures how far apart teacher and student start and the teacher's accuracy,
distils the student with each method (OPD, FKL-outlier and TrOPD by default) under the
same budget, prints one table and writes the runs, `summary.json` and plots
(`tropd.plot`) into one folder.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tropd.config import Config, load_config
from tropd.model_names import load_model, load_tokenizer
from tropd.plot import plot_runs, read_metrics
from tropd.recipes import mismatch as chain_models
from tropd.rollout import HFEngine
from tropd.tasks.chat import encode_prompt
from tropd.train import train
from tropd.train.heldout import heldout_metrics


@dataclass(frozen=True)
class DemoSettings:
    """The training budget every method gets (same steps, prompts, lr, seed). The lr is a
    tenth of the SFT recipes' peak lr; nothing here is tuned for one method."""

    steps: int
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 44  # the longest gold chain (42 characters) + EOS + 1
    lr: float = 3e-4
    grad_clip: float = 1.0
    top_k: int = 16
    eval_every: int = 20
    eval_prompts: int = 128


QUICK = DemoSettings(steps=60, eval_every=30, eval_prompts=64)
FULL = DemoSettings(steps=100, eval_every=50)


def cell_overrides(cell: str) -> list[str]:
    """Config overrides that give a run its cell's prompts (`multi`: two domains)."""
    return [f"task.options.domains={chain_models.MULTI_DOMAINS}"] if cell == "multi" else []


def demo_config(
    objective: str,
    teacher: str | Path,
    student: str | Path,
    settings: DemoSettings,
    out_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    overrides: list[str] | None = None,
) -> Config:
    """The run config of one method on the `chain` task (float32, CPU, greedy eval)."""
    s = settings
    return load_config(
        None,
        [
            f"run.output_dir={out_dir}",
            f"run.seed={seed}",
            f"run.steps={s.steps}",
            "run.save_every=0",
            "run.keep_checkpoints=1",
            f"run.progress={str(progress).lower()}",
            f"model.teacher={teacher}",
            f"model.student={student}",
            "model.dtype=float32",
            "model.device=cpu",
            "task.name=chain",
            f"rollout.prompts_per_step={s.prompts_per_step}",
            f"rollout.samples_per_prompt={s.samples_per_prompt}",
            f"rollout.max_new_tokens={s.max_new_tokens}",
            f"teacher.top_k={s.top_k}",
            f"objective.name={objective}",
            f"optim.lr={s.lr}",
            f"optim.grad_clip={s.grad_clip}",
            f"optim.micro_batch_size={s.prompts_per_step * s.samples_per_prompt}",
            f"eval.every={s.eval_every}",
            f"eval.num_prompts={s.eval_prompts}",
            "eval.temperature=0",
            *(overrides or []),
        ],
    )


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The numbers the demo table reports from one run directory:
    greedy held-out accuracy before (step 0) and after (last step), final exact reverse
    KL, the expected trust fraction E[min(1, π_T/q)] at the first and last step with
    student tokens (guided runs start fully off-policy), the share of student tokens
    routed to an outlier loss (mean over those steps; None for methods that route
    nothing), skipped steps and the seconds spent in training steps."""
    records = read_metrics(Path(run_dir))
    evals = [r for r in records if "eval/accuracy" in r]
    steps = [r for r in records if r["step"] > 0]
    if not evals or not steps:
        raise ValueError(f"{run_dir}: the run has no evaluation or no training step yet")
    on_policy = [r for r in steps if r.get("student_tokens", 0) > 0] or [{}]
    routed = [r["outlier_fraction"] for r in on_policy if "outlier_fraction" in r]
    return {
        "accuracy_before": evals[0]["eval/accuracy"],
        "accuracy_after": evals[-1]["eval/accuracy"],
        "reverse_kl_before": evals[0].get("eval/reverse_kl"),
        "reverse_kl_after": evals[-1].get("eval/reverse_kl"),
        "trust_probability_first": on_policy[0].get("trust_probability"),
        "trust_probability_last": on_policy[-1].get("trust_probability"),
        "outlier_fraction_mean": statistics.fmean(routed) if routed else None,
        "skipped_steps": steps[-1].get("skipped_steps", 0),
        "seconds": sum(r.get("time_step_s", 0.0) for r in steps),
    }


def run_methods(
    methods: list[str],
    teacher: Path,
    student: Path,
    settings: DemoSettings,
    out_dir: Path,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
    cell: str = "none",
) -> dict[str, dict[str, Any]]:
    """Train the student with each method in `out_dir/<method>`; return their summaries."""
    console = console or Console(stderr=True)
    results = {}
    for method in methods:
        console.print(f"[bold]{method}[/]: {settings.steps} steps -> {out_dir / method}")
        config = demo_config(
            method,
            teacher,
            student,
            settings,
            out_dir / method,
            seed,
            progress,
            cell_overrides(cell),
        )
        results[method] = summarize(train(config))
    return results


def cell_scores(
    model_dir: Path,
    cell: str,
    num_items: int,
    seed: int,
    max_new_tokens: int,
    teacher=None,
    samples: int = 1,
) -> dict[str, float]:
    """`heldout_metrics` of the model saved in `model_dir` on `num_items` held-out items of
    `cell` (drawn with `seed`): greedy accuracy, and with `samples` > 1 or a `teacher`
    model, sampled accuracy and exact reverse KL (sampling seeded by `seed`; the caller's
    torch RNG is left untouched)."""
    model = load_model(str(model_dir), "float32", "cpu").eval()
    tokenizer = load_tokenizer(str(model_dir))
    task = chain_models.cell_task(cell)
    items = task.items("eval", num_items, seed)
    prompts = [encode_prompt(tokenizer, item) for item in items]
    engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return heldout_metrics(
            model,
            teacher,
            engine,
            tokenizer,
            task,
            items,
            prompts,
            max_new_tokens,
            0.0,
            samples=samples,
        )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(cells: dict[str, dict[str, Any]], title: str) -> Table:
    """A rich table of the demo's cells: one row per cell and method (`summarize` results),
    with the teacher's accuracy on the same prompts."""
    table = Table(title=title)
    columns = {
        "cell": "teacher/student mismatch",
        "method": "method",
        "accuracy": "student's held-out accuracy before→after (greedy)",
        "teacher": "teacher's accuracy",
        "rev. KL": "exact reverse KL after (nats/token)",
        "trust p": "E[min(1, π_T/q)] first→last step",
        "outl.": "mean share routed to the outlier loss",
    }
    for column in columns:
        justify = "left" if column in ("cell", "method") else "right"
        table.add_column(column, justify=justify, overflow="fold")  # never cut a value
    table.caption = escape(
        "; ".join(f"{k}: {v}" for k, v in columns.items() if k not in ("cell", "method"))
    )
    for cell, c in cells.items():
        for method, r in c["results"].items():
            table.add_row(
                cell,
                method,
                f"{r['accuracy_before']:.2f}→{r['accuracy_after']:.2f}",
                f"{c['teacher_accuracy']:.2f}",
                _fmt(r["reverse_kl_after"]),
                f"{_fmt(r['trust_probability_first'])}→{_fmt(r['trust_probability_last'])}",
                _fmt(r["outlier_fraction_mean"]),
            )
    return table


def prepare_pair(
    mismatch: str, cache_dir: Path | None = None, console: Console | None = None
) -> tuple[Path, Path, dict[str, float]]:
    """(teacher dir, student dir, starting divergence) for a mismatch setting, building
    the models on first use."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    teacher = chain_models.prepare_chain_model(chain_models.TEACHER_RECIPE, cache_dir=cache_dir)
    task = chain_models.cell_task(mismatch)
    student = chain_models.prepare_chain_model(
        chain_models.student_recipe(mismatch), task, cache_dir=cache_dir
    )
    built = time.perf_counter() - started
    if built > 5:
        console.print(f"built the chain teacher and student in {built:.0f}s (cached from now on)")
    divergence = chain_models.measure_mismatch(
        load_model(str(teacher), "float32", "cpu"),
        load_model(str(student), "float32", "cpu"),
        load_tokenizer(str(student)),
        task,
    )
    return teacher, student, divergence


def run_demo(
    out_dir: Path,
    quick: bool = False,
    cells: tuple[str, ...] = ("none", "strong"),
    methods: tuple[str, ...] = ("opd", "fkl_outlier", "tropd"),
    seed: int = 0,
    cache_dir: Path | None = None,
    settings: DemoSettings | None = None,
    console: Console | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Prepare the models, run each method in each cell, print the table, write
    `summary.json` and the plots into `out_dir`; returns the summary.

    `threads`: torch threads while the demo runs (restored after; None: leave as is).
    One is fastest for these tiny models, and much faster on a busy machine, where a
    second thread competing for a core slowed a run by two orders of magnitude.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, quick, cells, methods, seed, cache_dir, settings, console)
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    out_dir: Path,
    quick: bool,
    cells: tuple[str, ...],
    methods: tuple[str, ...],
    seed: int,
    cache_dir: Path | None,
    settings: DemoSettings | None,
    console: Console | None,
) -> dict[str, Any]:
    console = console or Console(stderr=True)
    settings = settings or (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {str(out_dir)!r} is not empty; choose a new folder")
    started = time.perf_counter()
    summary: dict[str, Any] = {"cells": {}}
    written = "plots/, "
    for cell in cells:
        teacher, student, divergence = prepare_pair(cell, cache_dir, console)
        console.print(
            f"[bold]{cell}[/] mismatch: student samples have K1 reverse KL "
            f"{divergence['reverse_kl_k1']:.2f} nats/token, outlier fraction "
            f"{divergence['outlier_fraction']:.2f}, teacher prob < 1e-3 on "
            f"{divergence['near_zero_fraction']:.0%} of tokens"
        )
        runs = out_dir / cell
        results = run_methods(
            list(methods), teacher, student, settings, runs, seed, console=console, cell=cell
        )
        summary["cells"][cell] = {
            "teacher": str(teacher),
            "student": str(student),
            "divergence_at_start": divergence,
            "teacher_accuracy": cell_scores(
                teacher, cell, settings.eval_prompts, seed, settings.max_new_tokens
            )["eval/accuracy"],
            "results": results,
        }
        title = f"chain task, {cell} mismatch, {settings.steps} steps, seed {seed}"
        try:
            plot_runs([runs / m for m in methods], out_dir / "plots" / cell, list(methods), title)
        except ValueError as err:  # matplotlib missing: the runs and the table still stand
            console.print(f"[yellow]no plots:[/] {err}")
            written = ""
    title = f"chain task, {settings.steps} steps, seed {seed}"
    console.print(results_table(summary["cells"], title))
    summary.update(
        settings=dataclasses.asdict(settings),
        seed=seed,
        seconds=time.perf_counter() - started,
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"[green]done:[/] {out_dir} (summary.json, {written}one run per cell and method)")
    return summary
