"""Typed run settings: YAML plus dotted `key.sub=value` overrides, validated on load.

Every mistake a user can make here (a typo in a key, a wrong type, an impossible value)
raises `ConfigError` with one line naming the key path and the fix, before any model
is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    output_dir: str = "runs/tropd"  # the run directory
    seed: int = 0
    steps: int = Field(50, gt=0)  # optimizer steps
    save_every: int = Field(10, ge=0)  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = Field(2, gt=0)
    log_samples: int = Field(2, ge=0)  # samples per step written to samples.jsonl
    progress: bool = True  # rich progress bar


class ModelConfig(_Section):
    student: str = "builtin:add:student"  # HF id, local dir, or builtin:<task>:<role>
    teacher: str = "builtin:add:teacher"
    tokenizer: str | None = None  # default: the student's
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N


class TaskConfig(_Section):
    name: str = "add"  # a built-in task (see `tropd.tasks.list_tasks`)
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the task constructor
    system_prompt: str | None = None


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, gt=0)
    samples_per_prompt: int = Field(4, gt=0)
    max_new_tokens: int = Field(16, gt=0)  # L_0: the response budget
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class GuidanceConfig(_Section):
    enabled: bool | None = None  # None: on for objectives that use it (tropd)
    prefix: Literal["cap", "uniform"] = "cap"
    guided_fraction: float = Field(1.0, ge=0, le=1)  # share of rollouts with a prefix
    temperature: float = Field(1.0, gt=0)  # teacher sampling temperature


class TeacherConfig(_Section):
    top_k: int = Field(64, gt=0)  # k of the teacher's top-k log-probs
    chunk_size: int = Field(1024, gt=0)  # positions per chunk when scoring


class ObjectiveConfig(_Section):
    name: str = "tropd"
    options: dict[str, Any] = Field(default_factory=dict)  # see `tropd objectives`


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max grad norm (0: off)
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward/backward


class EvalConfig(_Section):
    every: int = Field(10, ge=0)  # evaluate every N steps (0: off)
    num_prompts: int = Field(64, gt=0)  # held-out prompts
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_objective(self) -> Config:
        from tropd.objectives import get_objective

        try:
            get_objective(self.objective.name, **self.objective.options)
        except ValueError as err:
            raise ValueError(f"objective: {err}") from None
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 1e-4, true, null, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=1e-4")
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:-1])} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file path")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return validate(data)


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            raise ConfigError(
                f"{where}: unknown key; check the spelling (see README config reference)"
            ) from None
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {message} (got {first.get('input')!r})") from None


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
