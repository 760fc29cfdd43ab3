"""Experiment trackers (`run.report_to`): what each backend records is what metrics.jsonl and
samples.jsonl hold, offline, only on rank 0, and a resumed run continues the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import interrupted_run, one_line, tiny_config

from tropd import cli
from tropd.config import ConfigError, load_config
from tropd.train import loop, trackers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_config(pair: tuple[str, str], run_dir: Path, *overrides: str):
    return tiny_config(
        pair,
        run_dir,
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "teacher.top_k=4",
        "eval.num_prompts=8",
        *overrides,
    )


def numbers(record: dict) -> dict[str, float]:
    """What a tracker logs of a metrics record: every number but the step (booleans as 0/1)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        scalars[tag] = {p.step: p.value for p in points}
    return scalars


def expected_scalars(metrics: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as TensorBoard stores it: each number rounded to float32 (the event
    protocol's `simple_value` is a float32), so the comparison can be exact."""
    expected: dict[str, dict[int, float]] = {}
    for record in metrics:
        for key, value in numbers(record).items():
            expected.setdefault(key, {})[record["step"]] = float(np.float32(value))
    return expected


def tensorboard_texts(run_dir: Path, tag: str) -> dict[int, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {
        e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")
    }


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "MODULES", {**trackers.MODULES, "wandb": ("no_such_module",)})
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "run.report_to=wandb"])
    with pytest.raises(ConfigError) as info:
        loop.train(config)
    message = one_line(info)
    assert "run.report_to" in message and "pip install 'tropd[wandb]'" in message
    assert not (tmp_path / "run").exists()  # stopped before the run folder was made


def test_report_to_is_validated_on_load():
    assert load_config(None, ["run.report_to=tensorboard"]).run.report_to == ["tensorboard"]
    assert load_config(None, []).run.report_to == []
    for bad in ("run.report_to=[tb]", "run.report_to=[wandb,wandb]"):
        with pytest.raises(ConfigError, match=r"run\.report_to"):
            load_config(None, [bad])


def test_tensorboard_holds_every_metric_the_config_and_the_samples_across_a_resume(
    tiny_pair, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    config = make_config(
        tiny_pair,
        tmp_path / "run",
        "run.steps=4",
        "run.save_every=2",
        "eval.every=4",
        "run.report_to=[tensorboard]",
    )
    interrupted_run(monkeypatch, config, at_step=4)  # after step 2's checkpoint
    # Step 3 was logged before the kill, then redone after resuming from step 2: the
    # event files must show the redone one only.
    assert 3 in tensorboard_scalars(tmp_path / "run")["loss"]
    run_dir = loop.train(config, resume=True)

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    scalars = tensorboard_scalars(run_dir)
    assert scalars == expected_scalars(metrics)
    assert {"loss", "grad_norm", "eval/accuracy", "skipped"} <= set(scalars)

    texts = tensorboard_texts(run_dir, "samples")
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert sorted(texts) == sorted({s["step"] for s in samples}) == [1, 2, 3, 4]
    for sample in samples:
        assert sample["prompt"].replace("\n", " ⏎ ") in texts[sample["step"]]
    config_texts = tensorboard_texts(run_dir, "config")
    assert sorted(config_texts) == [0, 2]  # the first start and the resume
    assert f"output_dir: {run_dir}" in config_texts[2]


def tracked_records() -> tuple[list[dict], list[dict]]:
    """Metrics records and samples rows shaped as the loop writes them."""
    records = [
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 1, "loss": 0.1 + 1e-12, "grad_norm": 3.0, "skipped": False, "note": "text"},
        {"step": 2, "loss": -0.5, "grad_norm": 2.0, "skipped": True, "eval/accuracy": 0.5},
    ]
    samples = [
        {"step": step, "prompt": f"1+{step}=", "teacher_prefix": "", "student": f"{step + 1}\n"}
        for step in (1, 2)
    ]
    return records, samples


def track_all(config, run_dir: Path, start: int, records: list[dict], samples: list[dict]):
    with trackers.tracking(config, run_dir, start) as track:
        for record in records:
            track(record, [s for s in samples if s["step"] == record["step"]])


@pytest.mark.slow  # MLflow creates its SQLite schema (migrations) at each new store
def test_mlflow_records_every_metric_exactly_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config(None, [f"run.output_dir={run_dir}", "run.report_to=[mlflow]"])
    records, samples = tracked_records()
    track_all(config, run_dir, 0, records[:2], samples)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    track_all(config, run_dir, 1, records[2:], samples)  # a resume after step 1
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == run_id

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["run.output_dir"] == str(run_dir)
    for key in {k for r in records for k in numbers(r)}:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        # MLflow stores float64, as JSON does: exact.
        assert history == {r["step"]: numbers(r)[key] for r in records if key in numbers(r)}
    for step in (1, 2):
        name = f"samples/step_{step:07d}.json"
        table = json.loads(Path(client.download_artifacts(run_id, name, tmp_path)).read_text())
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        assert rows == [s for s in samples if s["step"] == step]
    assert (run_dir / "mlflow-artifacts").is_dir()  # artifacts stay in the run folder


def test_wandb_writes_an_offline_run_in_the_run_folder_and_resumes_its_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config(None, [f"run.output_dir={run_dir}", "run.report_to=[wandb]"])
    records, samples = tracked_records()
    track_all(config, run_dir, 0, records[:2], samples)
    track_all(config, run_dir, 1, records[2:], samples)
    wandb.teardown()  # waits for W&B's writer process (at exit in a training run)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    logs = sorted((run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(logs) == 2  # one per start, one run id: `wandb sync` joins them
    # The log is W&B's binary record format (no Python reader ships); the metric and
    # config names must be in it.
    first, second = (log.read_bytes() for log in logs)
    for key in ("eval/accuracy", "loss", "grad_norm", "skipped", "output_dir", "prompt"):
        assert key.encode() in first, key
    assert b"eval/accuracy" in second


TRACKIO_SCRIPT = """
import json, sys
from tropd.config import load_config
from tropd.train import trackers
run_dir, records, samples = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
config = load_config(None, [f"run.output_dir={run_dir}", "run.report_to=[trackio]"])
for start, part in ((0, records[:2]), (1, records[2:])):
    with trackers.tracking(config, __import__("pathlib").Path(run_dir), start) as track:
        for record in part:
            track(record, [s for s in samples if s["step"] == record["step"]])
"""


def test_trackio_logs_locally_and_resumes_the_run_by_name(tmp_path):
    pytest.importorskip("trackio")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records, samples = tracked_records()
    # trackio reads TRACKIO_DIR when imported: a fresh process, so the test's folder is used.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    subprocess.run(
        [
            sys.executable,
            "-c",
            TRACKIO_SCRIPT,
            str(run_dir),
            json.dumps(records),
            json.dumps(samples),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    import sqlite3

    with sqlite3.connect(tmp_path / "trackio" / "tropd.db") as db:
        runs = db.execute("SELECT DISTINCT run_name FROM metrics").fetchall()
        rows = db.execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    assert runs == [("run",)]  # the resume continued the same run
    logged: dict[str, dict[int, float]] = {}
    for step, text in rows:
        for key, value in json.loads(text).items():
            if isinstance(value, int | float):
                logged.setdefault(key, {})[step] = value
    for key in {k for r in records for k in numbers(r)}:
        assert logged[key] == {r["step"]: numbers(r)[key] for r in records if key in numbers(r)}
    assert "samples" in json.loads(rows[-1][1])


def test_only_rank_0_opens_trackers(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.report_to=[tensorboard]"])
    with trackers.tracking(config, tmp_path, 0, enabled=False) as track:
        track({"step": 1, "loss": 1.0}, [])
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_missing_tracker_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trackers, "MODULES", {**trackers.MODULES, "mlflow": ("no_such_module",)})
    path = tmp_path / "cfg.yaml"
    path.write_text(f"run:\n  output_dir: {tmp_path / 'run'}\n  report_to: [mlflow]\n")
    assert cli.main(["train", str(path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "pip install 'tropd[mlflow]'" in err and "Traceback" not in err
