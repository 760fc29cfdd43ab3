"""`tropd demo`: the paper's experiment at CPU scale, in one command.

A `chain` teacher (forward chain-of-thought style) and a smaller student trained in
another style (`tropd.tasks.mismatch`, strong mismatch by default) are built on first
use and cached. The demo measures how far apart they start, distils the student with
each method (OPD and TrOPD by default) under the same budget, prints a table and
writes the runs, `summary.json` and plots (`tropd.plot`) into one folder.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tropd.config import Config, load_config


@dataclass(frozen=True)
class DemoSettings:
    """The training budget every method gets (same steps, prompts, lr, seed)."""

    steps: int
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 44
    lr: float = 1e-3
    grad_clip: float = 1.0
    top_k: int = 16
    eval_every: int = 5
    eval_prompts: int = 64


QUICK = DemoSettings(steps=12, eval_every=6)
FULL = DemoSettings(steps=60, eval_every=10, eval_prompts=128)


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
    """The numbers the demo table and the ablation report from one run directory:
    greedy held-out accuracy before (step 0) and after (last step), final exact reverse
    KL, the expected trust fraction E[min(1, π_T/q)] at the first and last step, the
    share of student tokens routed to an outlier loss (mean over steps; None for
    methods that route nothing), skipped steps and wall time."""
    from tropd.plot import read_metrics

    records = read_metrics(Path(run_dir))
    evals = [r for r in records if "eval/accuracy" in r]
    steps = [r for r in records if r["step"] > 0]
    if not evals or not steps:
        raise ValueError(f"{run_dir}: the run has no evaluation or no training step yet")
    routed = [r["outlier_fraction"] for r in steps if "outlier_fraction" in r]
    return {
        "accuracy_before": evals[0]["eval/accuracy"],
        "accuracy_after": evals[-1]["eval/accuracy"],
        "reverse_kl_before": evals[0].get("eval/reverse_kl"),
        "reverse_kl_after": evals[-1].get("eval/reverse_kl"),
        "trust_probability_first": steps[0].get("trust_probability"),
        "trust_probability_last": steps[-1].get("trust_probability"),
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
) -> dict[str, dict[str, Any]]:
    """Train the student with each method in `out_dir/<method>`; return their summaries."""
    from tropd.train import train

    console = console or Console(stderr=True)
    results = {}
    for method in methods:
        console.print(f"[bold]{method}[/]: {settings.steps} steps -> {out_dir / method}")
        config = demo_config(method, teacher, student, settings, out_dir / method, seed, progress)
        results[method] = summarize(train(config))
    return results


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(results: dict[str, dict[str, Any]], title: str) -> Table:
    """A rich table of `summarize` results, one row per method."""
    table = Table(title=title)
    for column in (
        "method",
        "accuracy before → after",
        "reverse KL after",
        "trust prob. first → last",
        "outliers routed",
        "skipped steps",
        "time (s)",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, r in results.items():
        table.add_row(
            method,
            f"{r['accuracy_before']:.3f} → {r['accuracy_after']:.3f}",
            _fmt(r["reverse_kl_after"], 3),
            f"{_fmt(r['trust_probability_first'])} → {_fmt(r['trust_probability_last'])}",
            _fmt(r["outlier_fraction_mean"]),
            str(r["skipped_steps"]),
            f"{r['seconds']:.0f}",
        )
    return table


def prepare_pair(
    mismatch: str, cache_dir: Path | None = None, console: Console | None = None
) -> tuple[Path, Path, dict[str, float]]:
    """(teacher dir, student dir, starting divergence) for a mismatch setting, building
    the models on first use."""
    from tropd.models import load_model, load_tokenizer
    from tropd.tasks.mismatch import (
        TEACHER_RECIPE,
        measure_mismatch,
        prepare_chain_model,
        student_recipe,
    )
    from tropd.tasks.reasoning import ChainTask

    console = console or Console(stderr=True)
    started = time.perf_counter()
    teacher = prepare_chain_model(TEACHER_RECIPE, cache_dir=cache_dir)
    student = prepare_chain_model(student_recipe(mismatch), cache_dir=cache_dir)
    built = time.perf_counter() - started
    if built > 5:
        console.print(f"built the chain teacher and student in {built:.0f}s (cached from now on)")
    divergence = measure_mismatch(
        load_model(str(teacher), "float32", "cpu"),
        load_model(str(student), "float32", "cpu"),
        load_tokenizer(str(student)),
        ChainTask(),
    )
    return teacher, student, divergence


def run_demo(
    out_dir: Path,
    quick: bool = False,
    mismatch: str = "strong",
    methods: tuple[str, ...] = ("opd", "tropd"),
    seed: int = 0,
    cache_dir: Path | None = None,
    settings: DemoSettings | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Prepare the models, run each method, print the table, write `summary.json` and
    the plots into `out_dir`; returns the summary."""
    from tropd.plot import plot_runs

    console = console or Console(stderr=True)
    settings = settings or (QUICK if quick else FULL)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {str(out_dir)!r} is not empty; choose a new folder")
    started = time.perf_counter()
    teacher, student, divergence = prepare_pair(mismatch, cache_dir, console)
    console.print(
        f"mismatch {mismatch}: student samples have K1 reverse KL "
        f"{divergence['reverse_kl_k1']:.2f} nats/token, outlier fraction "
        f"{divergence['outlier_fraction']:.2f}, teacher prob < 1e-3 on "
        f"{divergence['near_zero_fraction']:.0%} of tokens"
    )
    results = run_methods(list(methods), teacher, student, settings, out_dir, seed, console=console)
    title = f"chain task, {mismatch} mismatch, {settings.steps} steps, seed {seed}"
    console.print(results_table(results, title))
    plots = plot_runs([out_dir / m for m in methods], out_dir / "plots", list(methods), title)
    summary = {
        "mismatch": mismatch,
        "teacher": str(teacher),
        "student": str(student),
        "divergence_at_start": divergence,
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"[green]done:[/] {out_dir} (summary.json, plots/{plots[0].name}, one run per method)")
    return summary
