"""Can the paper's claim be tested here? Students with a capability gap, crossed with a
teacher/student style mismatch, distilled by every method under one budget.

    python bench/claim.py                                   # the whole study, then the report
    python bench/claim.py --part methods --cells none,strong --seeds 0,1 --methods opd,tropd
    python bench/claim.py --report                          # tables and plots from finished runs

The regime (`tropd.recipes.mismatch`): a `chain` teacher that solves the task, and
students trained to convergence on data with a slip (70% of the carries and borrows on
operands >= 7 are dropped), so they solve about half of the held-out problems and sample
wrong digits where the answer is decided. The cells cross that gap with a style mismatch:
`none` (the control: same style, only capability differs), `mild`, `strong`, and `multi`
(two domains, `add` and `sub` chains; the student writes `sub` in its own style).

Every run gets the same budget (`SETTINGS`: steps, 8 prompts x 4 rollouts, lr, gradient
clip, top-k) and seeds; methods keep their registry defaults, except the rollout
settings the README recommends for SeqKD and GKD (`OVERRIDES`). Parts:

- `cells`: the starting point of each cell (student and teacher accuracy, K1 reverse KL,
  outlier fraction, share of student tokens with pi_T < 1e-3);
- `guidance`: TrOPD's gate and guidance, one factor at a time around `GUIDANCE_BASE`
  (`VARIANTS`), on the `GUIDANCE_CELLS`;
- `methods`: every registered method on every cell.

Each run's final student is evaluated the same way (`heldout`): `EVAL_ITEMS` held-out
items of the cell (one fixed set), greedy accuracy, the mean accuracy of `EVAL_SAMPLES`
samples at temperature 1, the exact reverse KL to the teacher along those samples and,
in `multi`, both per domain. A finished run is not run again, so an interrupted study
resumes where it stopped. Writes bench/results/claim/: `results.json`, `report.md`,
`accuracy.png`, and the runs under `runs/<part>/<cell>/<name>/seed<k>/` (`config.yaml`,
`summary.json`, `metrics.jsonl.gz` and the last step's samples; weights are deleted once
evaluated).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tropd.demo import DemoSettings, cell_overrides, cell_scores, demo_config, prepare_pair
from tropd.model_names import load_model
from tropd.objectives import list_objectives
from tropd.plot import read_metrics
from tropd.train import train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "claim"
CELLS = ("none", "mild", "strong", "multi")
SEEDS = (0, 1, 2, 3, 4)
SETTINGS = DemoSettings(steps=100, eval_every=0)
EVAL_ITEMS, EVAL_SAMPLES, EVAL_SEED = 256, 4, 12345
OVERRIDES = {
    "seqkd": ["guidance.schedule=constant", "guidance.full_prefix=true"],
    "gkd": [
        "guidance.enabled=true",
        "guidance.schedule=constant",
        "guidance.guided_fraction=0.5",
        "guidance.full_prefix=true",
    ],
}
# TrOPD's gate and guidance, spelled out (so the study does not move with the defaults):
# hard gate, top-k FKL outliers, prefixes on every rollout capped at a share of the
# teacher's response that falls from 1 on a cosine, never the whole response, the prefix
# loss a separate mean weighted by beta.
GUIDANCE_BASE = [
    "objective.name=tropd",
    "objective.options.trust_gate=hard",
    "objective.options.beta=0.001",
    "objective.options.guidance_norm=separate",
    "guidance.enabled=true",
    "guidance.schedule=cosine",
    "guidance.prefix=cap",
    "guidance.cap_unit=fraction",
    "guidance.initial_cap=1.0",
    "guidance.guided_fraction=1.0",
    "guidance.full_prefix=false",
]
VARIANTS = {
    "base": [],
    "gate_soft": ["objective.options.trust_gate=soft"],
    "gate_threshold0": ["objective.options.trust_gate=threshold", "objective.options.tau=0"],
    "guidance_off": ["guidance.enabled=false"],
    "prefix_uniform": ["guidance.prefix=uniform"],
    "guided_0.5": ["guidance.guided_fraction=0.5"],
    "guided_0.25": ["guidance.guided_fraction=0.25"],
    "beta_0.1": ["objective.options.beta=0.1"],
    "beta_1": ["objective.options.beta=1.0"],
    "cap_half": ["guidance.initial_cap=0.5"],
    # The three levels that helped alone in the strong cell, together (interactions).
    "beta_1+guided_0.5+uniform": [
        "objective.options.beta=1.0",
        "guidance.guided_fraction=0.5",
        "guidance.prefix=uniform",
    ],
    # The shipped default with the cap in tokens (a share of rollout.max_new_tokens):
    # the teacher then stops writing at the cap instead of writing whole responses.
    "beta_1+guided_0.5+uniform+tokens": [
        "objective.options.beta=1.0",
        "guidance.guided_fraction=0.5",
        "guidance.prefix=uniform",
        "guidance.cap_unit=tokens",
        "guidance.initial_cap=null",
    ],
    # The guidance this project shipped before: every rollout guided from a cap of
    # rollout.max_new_tokens tokens (whole teacher responses at first), prefix tokens
    # in one mean with the student's.
    "legacy": [
        "guidance.cap_unit=tokens",
        "guidance.initial_cap=null",
        "guidance.full_prefix=true",
        "objective.options.guidance_norm=joint",
    ],
}
GUIDANCE_CELLS = ("strong", "none")


def run_specs(
    part: str, cells, seeds, methods, variants=tuple(VARIANTS)
) -> list[tuple[str, str, str, int, list[str]]]:
    """(part, cell, name, seed, overrides) of every run of `part` (of the guidance
    part: of `variants`)."""
    specs = []
    for cell in cells:
        for seed in seeds:
            if part == "guidance":
                if cell in GUIDANCE_CELLS:
                    specs += [
                        (part, cell, name, seed, GUIDANCE_BASE + VARIANTS[name])
                        for name in variants
                    ]
            else:
                specs += [
                    (part, cell, m, seed, [f"objective.name={m}", *OVERRIDES.get(m, [])])
                    for m in methods
                ]
    return specs


def run_one(spec, pairs: dict, out: Path) -> dict:
    part, cell, name, seed, overrides = spec
    run_dir = out / "runs" / part / cell / name / f"seed{seed}"
    done = run_dir / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run_dir.exists():  # interrupted: start it again
        shutil.rmtree(run_dir)
    teacher, student, _ = pairs[cell]
    config = demo_config(
        "opd", teacher, student, SETTINGS, run_dir, seed, False, cell_overrides(cell) + overrides
    )
    started = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - started
    records = [r for r in read_metrics(run_dir) if r["step"] > 0]
    on_policy = [r for r in records if r.get("student_tokens", 0) > 0] or [{}]
    summary = {
        **heldout(run_dir / "final", teacher, cell),
        "trust_probability_first": on_policy[0].get("trust_probability"),
        "trust_probability_last": on_policy[-1].get("trust_probability"),
        "outlier_fraction_mean": _mean(r.get("outlier_fraction") for r in on_policy),
        "grad_norm_mean": _mean(r.get("grad_norm") for r in records),
        "off_policy_steps": sum(r.get("student_tokens", 0) == 0 for r in records),
        "skipped_steps": records[-1].get("skipped_steps", 0),
        "wall_s": seconds,
    }
    for heavy in ("final", "checkpoints"):  # the weights are not needed once evaluated
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    samples = run_dir / "samples.jsonl"  # keep the last step's rollouts as examples
    last = [
        ln for ln in samples.read_text().splitlines() if json.loads(ln)["step"] == SETTINGS.steps
    ]
    samples.write_text("".join(line + "\n" for line in last))
    metrics = run_dir / "metrics.jsonl"  # kept compressed: hundreds of runs are committed
    metrics.with_suffix(".jsonl.gz").write_bytes(gzip.compress(metrics.read_bytes()))
    metrics.unlink()
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


_TEACHERS: dict[str, object] = {}


def heldout(model_dir: Path, teacher_dir: Path, cell: str) -> dict[str, float]:
    """The study's evaluation of one model on its cell's fixed held-out items."""
    if str(teacher_dir) not in _TEACHERS:
        _TEACHERS[str(teacher_dir)] = load_model(str(teacher_dir), "float32", "cpu").eval()
    scores = cell_scores(
        model_dir,
        cell,
        EVAL_ITEMS,
        EVAL_SEED,
        SETTINGS.max_new_tokens,
        _TEACHERS[str(teacher_dir)],
        EVAL_SAMPLES,
    )
    return {k.removeprefix("eval/"): v for k, v in scores.items()}


def cell_report(pairs: dict) -> dict:
    """Starting point of each cell: the untrained student and the teacher under the study's
    evaluation, and the divergence on student samples (`measure_mismatch`)."""
    return {
        cell: {
            "student": heldout(student, teacher, cell),
            "teacher": heldout(teacher, teacher, cell),
            "divergence": divergence,
        }
        for cell, (teacher, student, divergence) in pairs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="cells,methods,guidance")
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    # OPD and TrOPD's rows first, the other methods after them
    first = ["opd", "fkl_outlier", "tropd"]
    ordered = first + [m for m in list_objectives() if m not in first]
    parser.add_argument("--methods", default=",".join(ordered))
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="of the guidance part: which ones"
    )
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cells = args.cells.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.part.split(",")
    methods = args.methods.split(",")
    pairs = {cell: prepare_pair(cell) for cell in cells}
    if not args.report:
        variants = args.variants.split(",")
        if unknown := sorted(set(variants) - set(VARIANTS)):
            sys.exit(f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
        specs = [
            s for p in parts if p != "cells" for s in run_specs(p, cells, seeds, methods, variants)
        ]
        if args.worker is not None:
            for spec in specs[args.worker :: args.workers]:
                run_one(spec, pairs, args.out)
            return
        if "cells" in parts:
            cells_file = args.out / "cells.json"
            args.out.mkdir(parents=True, exist_ok=True)
            cells_file.write_text(json.dumps(cell_report(pairs), indent=2) + "\n")
        workers = [subprocess_worker(i, args.workers, sys.argv[1:]) for i in range(args.workers)]
        for worker in workers:
            worker.wait()
    write_report(args.out, cells, methods, "python " + " ".join(shlex.quote(a) for a in sys.argv))


def collect(out: Path) -> dict:
    """Every finished run's summary: `runs[part][cell][name][seed]`."""
    runs: dict = {}
    for done in sorted((out / "runs").glob("*/*/*/seed*/summary.json")):
        part, cell, name, seed = done.parts[-5:-1]
        runs.setdefault(part, {}).setdefault(cell, {}).setdefault(name, {})[seed] = json.loads(
            done.read_text()
        )
    return runs


def mean_std(values: list[float], signed: bool = False) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{'+' if signed else ''}.3f} ± {std:.3f}"


def paired(runs: dict, reference: dict, key: str = "accuracy") -> str:
    """Mean ± std over shared seeds of (run - reference), and wins/seeds."""
    seeds = sorted(set(runs) & set(reference))
    diffs = [runs[s][key] - reference[s][key] for s in seeds]
    if not diffs:
        return "—"
    wins = sum(d > 0 for d in diffs)
    return f"{mean_std(diffs, signed=True)} ({wins}/{len(diffs)})"


def write_report(out: Path, cells, methods, command: str) -> None:
    """`results.json` (every summary and the cells' starting points), `report.md` (the
    tables) and `accuracy.png` (gain over the untrained student per method and cell)."""
    runs = collect(out)
    start = json.loads((out / "cells.json").read_text()) if (out / "cells.json").is_file() else {}
    (out / "results.json").write_text(
        json.dumps({"command": command, "cells": start, "runs": runs}, indent=2) + "\n"
    )
    cells = [c for c in cells if c in runs.get("methods", {}) or c in start]
    lines = [f"Command: `{command}`", "", "## Cells at step 0", ""]
    lines += [
        "| cell | student greedy | student sampled | teacher greedy | K1 reverse KL "
        "| outlier fraction | π_T < 1e-3 | outlier mass on first 3 tokens | on digits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        if cell not in start:
            continue
        c = start[cell]
        d = c["divergence"]
        lines.append(
            f"| {cell} | {c['student']['accuracy']:.3f} | {c['student']['sampled_accuracy']:.3f} "
            f"| {c['teacher']['accuracy']:.3f} | {d['reverse_kl_k1']:.2f} "
            f"| {d['outlier_fraction']:.3f} | {d['near_zero_fraction']:.3f} "
            f"| {d['outlier_share_opening']:.2f} | {d['outlier_share_digits']:.2f} |"
        )
    method_runs = runs.get("methods", {})
    gains: dict[str, dict[str, list[float]]] = {}
    for key, label in (("accuracy", "greedy"), ("sampled_accuracy", "mean of 4 samples, T=1")):
        lines += [
            "",
            f"## Held-out accuracy gain over the untrained student ({label})",
            "",
            f"Mean ± std over seeds; {EVAL_ITEMS} held-out items; the student row is its "
            "accuracy before training.",
            "",
            "| method | " + " | ".join(cells) + " |",
            "|---|" + "---|" * len(cells),
        ]
        base = {c: start.get(c, {}).get("student", {}).get(key) for c in cells}
        lines.append("| student | " + " | ".join(_fmt(base[c]) for c in cells) + " |")
        for method in methods:
            row = []
            for cell in cells:
                seeds = method_runs.get(cell, {}).get(method, {})
                values = [r[key] - base[cell] for r in seeds.values() if base[cell] is not None]
                row.append(mean_std(values, signed=True))
                if key == "accuracy":
                    gains.setdefault(method, {})[cell] = values
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += _method_table(
        "Paired against OPD (same seeds): accuracy difference, mean ± std (wins/seeds)",
        methods,
        cells,
        lambda cell, seeds: paired(seeds, method_runs.get(cell, {}).get("opd", {})),
        method_runs,
    )
    lines += _method_table(
        "Exact reverse KL to the teacher after training (nats/token), mean ± std",
        methods,
        cells,
        lambda cell, seeds: mean_std([r["reverse_kl"] for r in seeds.values()]),
        method_runs,
    )
    if "multi" in cells:
        lines += _domain_table(method_runs.get("multi", {}), start.get("multi", {}), methods)
    lines += _guidance_tables(runs.get("guidance", {}), method_runs)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot_gains(gains, cells, out / "accuracy.png")


def _method_table(title: str, methods, cells, value, method_runs: dict) -> list[str]:
    """A markdown table, one row per method and one column per cell, of
    `value(cell, {seed: summary})`."""
    lines = ["", f"## {title}", "", "| method | " + " | ".join(cells) + " |"]
    lines.append("|---|" + "---|" * len(cells))
    for method in methods:
        row = [value(c, method_runs.get(c, {}).get(method, {})) for c in cells]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _domain_table(multi: dict, start: dict, methods) -> list[str]:
    lines = [
        "",
        "## Multi-domain cell: greedy accuracy per domain (the student writes `sub` in its "
        "own style), mean ± std",
        "",
        "| method | add | sub | overall |",
        "|---|---|---|---|",
    ]
    if start:
        s = start["student"]
        lines.append(
            f"| student | {s['accuracy/add']:.3f} | {s['accuracy/sub']:.3f} | {s['accuracy']:.3f} |"
        )
    for method in methods:
        seeds = multi.get(method, {}).values()
        row = [
            mean_std([r[k] for r in seeds]) for k in ("accuracy/add", "accuracy/sub", "accuracy")
        ]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def _guidance_tables(guidance: dict, method_runs: dict) -> list[str]:
    lines = []
    for cell, variants in guidance.items():
        opd = method_runs.get(cell, {}).get("opd", {})
        base = variants.get("base", {})
        lines += [
            "",
            f"## TrOPD's gate and guidance, one factor at a time ({cell} cell)",
            "",
            "`base`: " + ", ".join(f"`{o}`" for o in GUIDANCE_BASE[1:]) + ".",
            "",
            "| variant | accuracy | sampled accuracy | reverse KL | vs base (paired) "
            "| vs OPD (paired) | grad norm | off-policy steps |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in VARIANTS:
            seeds = variants.get(name, {})
            if not seeds:
                continue
            values = list(seeds.values())
            lines.append(
                f"| {name} | {mean_std([r['accuracy'] for r in values])} "
                f"| {mean_std([r['sampled_accuracy'] for r in values])} "
                f"| {mean_std([r['reverse_kl'] for r in values])} "
                f"| {paired(seeds, base) if name != 'base' else '—'} | {paired(seeds, opd)} "
                f"| {mean_std([r['grad_norm_mean'] for r in values])} "
                f"| {statistics.fmean(r['off_policy_steps'] for r in values):.1f} |"
            )
    return lines


def _plot_gains(gains: dict, cells, path: Path) -> None:
    import matplotlib.pyplot as plt  # the plot extra, needed only here

    methods = [m for m in gains if any(gains[m].get(c) for c in cells)]
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(max(8, len(methods) * 0.8), 4.5))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
        values = [gains[m].get(cell) or [0.0] for m in methods]
        means = [statistics.fmean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        xs = [j + (i - (len(cells) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, means, width, yerr=stds, label=cell, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    ax.set_ylabel("greedy accuracy gain over the untrained student")
    ax.legend(title="mismatch cell")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def subprocess_worker(index: int, count: int, argv: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, *argv, "--workers", str(count), "--worker", str(index)]
    return subprocess.Popen(cmd, env=env)


if __name__ == "__main__":
    main()
