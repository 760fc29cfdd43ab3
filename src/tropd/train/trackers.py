"""Experiment trackers: `run.report_to` sends what `metrics.jsonl` and `samples.jsonl` hold
to TensorBoard, Weights & Biases, Trackio and MLflow, besides those files.

Each tracker gets every number of each metrics record at its `step`, the resolved config,
and each step's sample rollouts as a table. Each is an optional extra
(`pip install 'tropd[tensorboard]'`, ...) imported only when chosen, and all work offline:
TensorBoard event files in `<run>/tensorboard`; W&B in offline mode under `<run>/wandb`
unless `WANDB_MODE` says otherwise; Trackio's local database; MLflow's SQLite store
`<run>/mlflow.db` unless `MLFLOW_TRACKING_URI` says otherwise. A resumed run continues the
same tracker run (W&B and MLflow run ids are kept in `<run>/trackers.json`, Trackio finds
the run by name, TensorBoard hides the events written after the checkpoint it resumes from).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from tropd.config import Config, ConfigError

# The modules each tracker imports (all must be installed; its extra brings them).
MODULES = {
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),
}
SAMPLE_COLUMNS = ("step", "prompt", "teacher_prefix", "student")

# What a tracker does each step: (numbers of the metrics record, its step, the step's
# samples.jsonl rows) -> None.
LogStep = Callable[[dict[str, float], int, list[dict[str, Any]]], None]


def check_installed(report_to: list[str]) -> None:
    """A `ConfigError` naming the pip install for the first tracker that is not installed,
    raised before anything is loaded or written."""
    for name in report_to:
        if any(importlib.util.find_spec(module) is None for module in MODULES[name]):
            raise ConfigError(
                f"run.report_to: {name} is not installed; pip install 'tropd[{name}]' "
                f"or remove {name} from run.report_to"
            )


@contextmanager
def tracking(
    config: Config, run_dir: Path, start: int, enabled: bool = True
) -> Iterator[Callable[[dict[str, Any], list[dict[str, Any]]], None]]:
    """Open the trackers of `config.run.report_to` for a run that starts after step `start`
    (0: a new run) and yield `log(record, samples)`: a metrics record as written to
    `metrics.jsonl` and its step's rows of `samples.jsonl`. The trackers are closed on
    exit, also on an error. Not `enabled` (ranks other than 0) it opens none."""
    names = config.run.report_to if enabled else []
    settings = config.model_dump(mode="json")  # as config.yaml: secrets already masked
    ids_path = run_dir / "trackers.json"
    ids = json.loads(ids_path.read_text()) if start and ids_path.exists() else {}
    openers = {
        "tensorboard": _tensorboard,
        "wandb": _wandb,
        "trackio": _trackio,
        "mlflow": _mlflow,
    }
    with ExitStack() as stack:
        loggers = [
            openers[name](stack, run_dir, settings, config.run.project, start, ids)
            for name in names
        ]
        if names:
            ids_path.write_text(json.dumps(ids))

        def log(record: dict[str, Any], samples: list[dict[str, Any]]) -> None:
            numbers = {
                key: float(value)
                for key, value in record.items()
                if key != "step" and isinstance(value, int | float)
            }
            for logger in loggers:
                logger(numbers, record["step"], samples)

        yield log


def _rows(samples: list[dict[str, Any]]) -> list[list[Any]]:
    return [[sample.get(column, "") for column in SAMPLE_COLUMNS] for sample in samples]


def _tensorboard(
    stack: ExitStack, run_dir: Path, settings: dict, project: str, start: int, ids: dict
) -> LogStep:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: events past the resumed checkpoint (logged before a kill) are hidden.
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
    stack.callback(writer.close)
    config_text = yaml.safe_dump(settings, sort_keys=False)
    writer.add_text("config", "".join(f"    {line}\n" for line in config_text.splitlines()), start)

    def log(numbers: dict[str, float], step: int, samples: list[dict[str, Any]]) -> None:
        for key, value in numbers.items():
            writer.add_scalar(key, value, step)
        if samples:
            writer.add_text("samples", _markdown_table(samples), step)
        writer.flush()

    return log


def _markdown_table(samples: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (TensorBoard renders text as Markdown); line breaks
    inside a cell shown as ⏎."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in _rows(samples)]
    return "\n".join(lines)


def _wandb(
    stack: ExitStack, run_dir: Path, settings: dict, project: str, start: int, ids: dict
) -> LogStep:
    import wandb

    run = wandb.init(
        project=project,
        name=run_dir.name,
        id=ids.get("wandb"),  # None: a new run, its id kept for a resume
        dir=str(run_dir),
        config=settings,
        resume="allow",
        mode=None if os.environ.get("WANDB_MODE") else "offline",  # offline unless asked
    )
    ids["wandb"] = run.id
    stack.callback(run.finish)
    return _logging_tables(run, wandb.Table)


def _trackio(
    stack: ExitStack, run_dir: Path, settings: dict, project: str, start: int, ids: dict
) -> LogStep:
    import trackio

    run = trackio.init(
        project=project,
        name=run_dir.name,
        config=settings,
        resume="allow" if start else "never",  # runs are found by name; a new run is new
    )
    stack.callback(trackio.finish)
    return _logging_tables(run, trackio.Table)


def _logging_tables(run, table) -> LogStep:
    """`LogStep` for a W&B-style run: `run.log(numbers, step=)`, the step's samples as a
    `table(columns=, data=)` under `samples` when there are any."""

    def log(numbers: dict[str, float], step: int, samples: list[dict[str, Any]]) -> None:
        extra = {"samples": table(columns=list(SAMPLE_COLUMNS), data=_rows(samples))}
        run.log({**numbers, **(extra if samples else {})}, step=step)

    return log


def _mlflow(
    stack: ExitStack, run_dir: Path, settings: dict, project: str, start: int, ids: dict
) -> LogStep:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    if run_id := ids.get("mlflow"):
        client.update_run(run_id, status="RUNNING")
    else:
        experiment = client.get_experiment_by_name(project)
        artifacts = None if uri else (run_dir / "mlflow-artifacts").resolve().as_uri()
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(project, artifact_location=artifacts)
        )
        run_id = ids["mlflow"] = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        # Parameters cannot change once logged: the config of the run's first start.
        params = [Param(key, str(value)) for key, value in _flatten(settings).items()]
        client.log_batch(run_id, params=params)
    stack.callback(client.set_terminated, run_id)
    client.log_dict(run_id, settings, f"config/start_{start:07d}.yaml")

    def log(numbers: dict[str, float], step: int, samples: list[dict[str, Any]]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in numbers.items()]
        client.log_batch(run_id, metrics=metrics)
        if samples:  # one JSON table per step (mlflow's log_table re-infers types: "2" -> 2)
            table = {"columns": list(SAMPLE_COLUMNS), "data": _rows(samples)}
            client.log_dict(run_id, table, f"samples/step_{step:07d}.json")

    return log


def _flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """`{"run": {"steps": 5}}` -> `{"run.steps": 5}` (MLflow parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
