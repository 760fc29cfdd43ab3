"""`tropd plot RUN_DIR... --out DIR`: training curves of one or more runs, overlaid.

Reads each run's `metrics.jsonl` (and `config.yaml` for its label) and writes, with
matplotlib (extra `plot`), one PNG per panel plus `curves.png` holding all panels.
A panel a run has no values for is skipped for that run; a panel no run has is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

PANELS: dict[str, tuple[tuple[str, ...], str]] = {
    "accuracy": (("eval/accuracy",), "held-out accuracy"),
    "reverse_kl": (("eval/reverse_kl",), "held-out reverse KL (nats/token)"),
    "reward": (("reward_mean",), "mean reward r = log π_T − log q (−K1)"),
    "grad_norm": (("grad_norm",), "gradient norm (before clipping)"),
    "entropy": (("student_entropy",), "student entropy (nats)"),
    "trust": (
        ("trust_probability", "trust_fraction", "outlier_fraction"),
        "trust prob. E[min(1, π_T/q)] (—), trust (--) / outlier (:) fractions",
    ),
    "prefix_cap": (("prefix_cap", "prefix_len_mean"), "prefix cap L_max (—), mean prefix (--)"),
}
"""Panel file name -> (metric keys drawn in it, solid/dashed/dotted; title)."""
LINESTYLES = ("-", "--", ":")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl; pass run directories written by tropd")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run_label(run_dir: Path) -> str:
    """The run's folder name, with its objective when that is not already in the name."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        return run_dir.name
    objective = (yaml.safe_load(config.read_text()) or {}).get("objective", {}).get("name")
    return (
        run_dir.name
        if not objective or objective in run_dir.name
        else f"{run_dir.name} ({objective})"
    )


PER_STUDENT_TOKEN = {
    "reward_mean",
    "student_entropy",
    "trust_probability",
    "trust_fraction",
    "outlier_fraction",
}
"""Averages over student tokens: undefined (logged as 0) on fully off-policy steps."""


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have it; per-student-token averages
    are left out on steps without student tokens."""
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float))
        and not (key in PER_STUDENT_TOKEN and r.get("student_tokens", 1) == 0)
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    labels: list[str] | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write the panels of `PANELS` for the runs in `run_dirs` into `out_dir`; returns
    the PNG paths (`curves.png` first). `labels` name the runs (default `run_label`)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'tropd[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(Path(d)) for d in run_dirs]
    labels = labels or [run_label(Path(d)) for d in run_dirs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    present = {
        name: keys
        for name, (keys, _) in PANELS.items()
        if any(series(records, key)[0] for records in runs for key in keys)
    }
    if not present:
        raise ValueError("no plottable metrics in these runs (is metrics.jsonl empty?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, name: str) -> None:
        for i, (records, label) in enumerate(zip(runs, labels, strict=True)):
            for key, style in zip(present[name], LINESTYLES, strict=False):
                steps, values = series(records, key)
                if steps:
                    shown = label if key == _first_key(records, present[name]) else None
                    ax.plot(
                        steps,
                        values,
                        linestyle=style,
                        color=colors[i % len(colors)],
                        marker="o" if len(steps) <= 12 else None,
                        markersize=3,
                        label=shown,
                    )
        ax.set_title(PANELS[name][1], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, present, strict=False):
        draw(ax, name)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03 + 0.02 * (len(names) // 4), 1, 1))
    written = [out_dir / "curves.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    for name in present:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        draw(ax, name)
        ax.legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        written.append(out_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _first_key(records: list[dict], keys: tuple[str, ...]) -> str | None:
    """The first of `keys` this run has values for (the line that carries its legend)."""
    return next((key for key in keys if series(records, key)[0]), None)
