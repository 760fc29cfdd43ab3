"""`tropd plot`: PNGs of several runs overlaid, from their metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from tropd import cli
from tropd.plot import plot_runs, run_label


def _fake_run(path, objective: str, routed: bool) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"objective:\n  name: {objective}\n")
    records = [{"step": 0, "eval/accuracy": 0.5, "eval/reverse_kl": 1.0}]
    for step in range(1, 6):
        record = {
            "step": step,
            "loss": 1.0 / step,
            "grad_norm": 2.0,
            "reward_mean": -1.0 / step,
            "student_entropy": 0.5,
            "trust_probability": 0.5 + 0.05 * step,
            "prefix_cap": 8.0 - step,
        }
        if routed:
            record.update(trust_fraction=0.5, outlier_fraction=0.5)
        records.append(record)
    records.append({"step": 5, "eval/accuracy": 0.7, "eval/reverse_kl": 0.4})
    text = "".join(json.dumps(r) + "\n" for r in records)
    (path / "metrics.jsonl").write_text(text + '{"step": 6, "lo')  # a line cut short


def test_plot_writes_one_png_per_panel_and_a_grid(tmp_path):
    _fake_run(tmp_path / "a", "opd", routed=False)
    _fake_run(tmp_path / "b", "tropd", routed=True)
    written = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "out", title="t")
    names = [p.name for p in written]
    assert names[0] == "curves.png"
    expected = {"accuracy", "reverse_kl", "reward", "grad_norm", "entropy", "trust", "prefix_cap"}
    assert {f"{n}.png" for n in expected} == set(names[1:])
    for path in written:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def test_plot_cli_and_errors(tmp_path):
    _fake_run(tmp_path / "run-opd", "opd", routed=False)
    assert run_label(tmp_path / "run-opd") == "run-opd"
    assert cli.main(["plot", str(tmp_path / "run-opd"), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "curves.png").is_file()
    assert cli.main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "png")]) == 2
    with pytest.raises(ValueError, match="labels"):
        plot_runs([tmp_path / "run-opd"], tmp_path / "png", labels=["a", "b"])
