"""Ablation of the paper's Table 1 at CPU scale: every method × mismatch setting × seed.

    python bench/ablation.py                               # the configured study
    python bench/ablation.py --steps 10 --seeds 0 --mismatch strong --methods opd,tropd

Teacher and students come from `tropd.recipes.mismatch` (the `chain` task; built on
first use and cached). Every method gets the same budget (`tropd.demo.DemoSettings`:
steps, prompts, rollouts, lr, gradient clip, top-k) and the same seeds; its own
options stay at their registry defaults. Accuracy is the verifier on held-out prompts,
greedy (`eval.temperature=0`), before training (the `student` row) and after the last
step. Methods listed in `OVERRIDES` also get the rollout settings the README
recommends for them. A finished run is not run again, so an interrupted study resumes
where it stopped. Writes to bench/results/ablation/: `results.json` (every run's summary and
the starting divergence of each setting), `table.md` (mean ± std over seeds),
`accuracy.png` (final accuracy per method) and `curves_<mismatch>.png` (seed-averaged
curves), with the runs under `runs/<mismatch>/<method>/seed<k>/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from tropd.demo import DemoSettings, demo_config, prepare_pair, summarize
from tropd.plot import read_metrics, series
from tropd.train import train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "ablation"
METHODS = (
    "opd",
    "topk_fkl",
    "clip_outlier",
    "mask_outlier",
    "fkl_outlier",
    "tropd",
    "jsd_topk",
    "entropy_opd",
    "eopd",
    "reopold",
    "gkd",
    "seqkd",
    "top_d",
    "trb",
    "ta_opd",
    "grpo",
    "opd_task",
)
# The README's recommended settings for the methods whose defaults need the rollout's
# help: SeqKD trains on whole teacher responses, GKD mixes on-policy and teacher
# sequences at λ = 0.5 (the paper's default).
OVERRIDES = {
    "seqkd": ["guidance.schedule=constant"],
    "gkd": ["guidance.enabled=true", "guidance.schedule=constant", "guidance.guided_fraction=0.5"],
}
MISMATCH = ("none", "mild", "strong")
SETTINGS = DemoSettings(steps=100, eval_every=50)


def run_one(method: str, mismatch: str, seed: int, pair, settings, out: Path) -> dict:
    run_dir = out / "runs" / mismatch / method / f"seed{seed}"
    done = run_dir / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run_dir.exists():  # interrupted: start it again
        shutil.rmtree(run_dir)
    teacher, student = pair
    config = demo_config(
        method,
        teacher,
        student,
        settings,
        run_dir,
        seed,
        progress=False,
        overrides=OVERRIDES.get(method),
    )
    started = time.perf_counter()
    train(config)
    summary = {**summarize(run_dir), "wall_s": time.perf_counter() - started}
    for heavy in ("final", "checkpoints"):  # the weights are not needed for the study
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    samples = run_dir / "samples.jsonl"  # keep the last step's rollouts as examples
    last = [
        line
        for line in samples.read_text().splitlines()
        if json.loads(line)["step"] == settings.steps
    ]
    samples.write_text("".join(line + "\n" for line in last))
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def write_table(results: dict, divergence: dict, methods, mismatches, settings, out: Path) -> str:
    lines = [
        "Held-out accuracy (greedy, verifier on the final answer) after "
        f"{settings.steps} steps, mean ± std over seeds "
        f"{', '.join(str(s) for s in results['seeds'])}. `student`: before training.",
        "",
        "| method | " + " | ".join(f"{m} mismatch" for m in mismatches) + " |",
        "|---|" + "---|" * len(mismatches),
    ]

    def cell(m: str, method: str, key: str) -> list[float]:
        runs = results["runs"].get(m, {}).get(method, {})
        return [r[key] for r in runs.values() if r.get(key) is not None]

    student = [mean_std(cell(m, methods[0], "accuracy_before")) for m in mismatches]
    lines.append("| student (no training) | " + " | ".join(student) + " |")
    for method in methods:
        row = [mean_std(cell(m, method, "accuracy_after")) for m in mismatches]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Exact held-out reverse KL `KL(π_S‖π_T)` (nats/token) after training, and the "
        "expected trust fraction E[min(1, π_T/q)] on the last step's rollouts:",
        "",
        "| method | "
        + " | ".join(f"{m}: reverse KL | {m}: trust prob." for m in mismatches)
        + " |",
        "|---|" + "---|---|" * len(mismatches),
    ]
    before = []
    for m in mismatches:
        before += [mean_std(cell(m, methods[0], "reverse_kl_before")), "—"]
    lines.append("| student (no training) | " + " | ".join(before) + " |")
    for method in methods:
        row = []
        for m in mismatches:
            row += [
                mean_std(cell(m, method, "reverse_kl_after")),
                mean_std(cell(m, method, "trust_probability_last")),
            ]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Starting divergence of each setting (student samples at temperature 1 on 64 "
        "held-out prompts × 4, scored by the teacher):",
        "",
        "| mismatch | student style | K1 reverse KL | outlier fraction 1−E[min(1,π_T/q)] "
        "| tokens with π_T < 1e-3 | student sample accuracy |",
        "|---|---|---|---|---|---|",
    ]
    from tropd.recipes.mismatch import MISMATCH

    for m in mismatches:
        d, (style, share, _) = divergence[m], MISMATCH[m]
        lines.append(
            f"| {m} | {style}, {share:.0%} in the teacher's | {d['reverse_kl_k1']:.2f} | "
            f"{d['outlier_fraction']:.3f} | {d['near_zero_fraction']:.3f} | "
            f"{d['student_accuracy']:.3f} |"
        )
    skipped = sum(
        r["skipped_steps"]
        for by in results["runs"].values()
        for s in by.values()
        for r in s.values()
    )
    lines += ["", f"Skipped (non-finite) steps over all runs: {skipped}."]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def plot(results: dict, methods, mismatches, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    rows = ["student", *methods]
    width = 0.8 / len(mismatches)
    for j, m in enumerate(mismatches):
        means, stds = [], []
        for method in rows:
            runs = results["runs"].get(m, {}).get(methods[0] if method == "student" else method, {})
            key = "accuracy_before" if method == "student" else "accuracy_after"
            values = [r[key] for r in runs.values()]
            means.append(statistics.fmean(values) if values else 0.0)
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        xs = [i + (j - (len(mismatches) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"{m} mismatch")
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(mismatches), loc="upper center")
    ax.set_title("chain task: accuracy after training, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    panels = (
        ("eval/accuracy", "held-out accuracy"),
        ("eval/reverse_kl", "held-out reverse KL"),
        ("trust_probability", "trust prob. E[min(1, π_T/q)]"),
        ("grad_norm", "gradient norm (before clipping)"),
    )
    for m in mismatches:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
        for ax, (key, title) in zip(axes, panels, strict=True):
            for method in methods:
                runs = [
                    read_metrics(out / "runs" / m / method / f"seed{s}") for s in results["seeds"]
                ]
                by_step: dict[int, list[float]] = {}
                for records in runs:  # seeds may log a metric on different steps
                    for step, value in zip(*series(records, key), strict=True):
                        by_step.setdefault(step, []).append(value)
                if not by_step:
                    continue
                steps = sorted(by_step)
                mean = [statistics.fmean(by_step[step]) for step in steps]
                style = "-" if method in ("opd", "tropd", "fkl_outlier") else ":"
                ax.plot(steps, mean, style, label=method, lw=2 if style == "-" else 1.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle(f"chain task, {m} mismatch (mean over seeds)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"curves_{m}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mismatch", default=",".join(MISMATCH))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=SETTINGS.steps)
    parser.add_argument("--lr", type=float, default=SETTINGS.lr)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see README)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    mismatches = args.mismatch.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = dataclasses.replace(SETTINGS, steps=args.steps, lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    started = time.perf_counter()
    results: dict = {
        "command": "python bench/ablation.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "settings": dataclasses.asdict(settings),
        "seeds": seeds,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "divergence": {},
        "runs": {},
    }
    for m in mismatches:
        teacher, student, divergence = prepare_pair(m, console=console)
        results["divergence"][m] = divergence
        console.print(f"[bold]{m} mismatch[/]: {json.dumps(divergence)}")
        for seed in seeds:
            for method in methods:
                summary = run_one(method, m, seed, (teacher, student), settings, out)
                results["runs"].setdefault(m, {}).setdefault(method, {})[str(seed)] = summary
                console.print(
                    f"  {m:6s} seed {seed} {method:13s} acc {summary['accuracy_before']:.3f} -> "
                    f"{summary['accuracy_after']:.3f}  rkl {summary['reverse_kl_after']:.3f}  "
                    f"{summary['wall_s']:.0f}s"
                )
    results["wall_s"] = time.perf_counter() - started  # this invocation (finished runs are reused)
    results["runs_wall_s"] = sum(
        r["wall_s"] for by in results["runs"].values() for s in by.values() for r in s.values()
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(write_table(results, results["divergence"], methods, mismatches, settings, out))
    plot(results, methods, mismatches, out)


if __name__ == "__main__":
    main()
