"""Typed run settings: YAML plus dotted `key.sub=value` overrides, validated on load.

Every mistake a user can make here (a typo in a key, a wrong type, an impossible value)
raises `ConfigError` with one line naming the key path and the fix, before any model
is loaded. The objective's name and options are checked where the run is built
(`tropd.train.loop.objective_from_config`), still before anything is written or loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and the fix."""


class _Section(BaseModel):
    # No inf/NaN anywhere: an infinite lr or temperature only fails later, deep in a step.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`run.steps: true` is not 1: a boolean is refused where no boolean is allowed."""
        annotation = cls.model_fields[info.field_name].annotation
        allowed = (annotation, *get_args(annotation))
        if (
            isinstance(value, bool)
            and bool not in allowed
            and any(t in (int, float) for t in allowed)
        ):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class RunConfig(_Section):
    output_dir: str = Field("runs/tropd", description="the run directory")
    seed: int = Field(0, description="seeds sampling, the trust gate and data order")
    steps: int = Field(50, gt=0, description="optimizer steps S (also the guidance horizon)")
    save_every: int = Field(10, ge=0, description="checkpoint every N steps (0: only the last)")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept on disk")
    log_samples: int = Field(2, ge=0, description="rollouts per step written to samples.jsonl")
    progress: bool = Field(True, description="show the rich progress bar")


class ModelConfig(_Section):
    student: str = Field(
        "builtin:add:student",
        description="HF id, local directory, builtin:<task>:<role> (trained and cached), "
        "gguf:PATH or *.gguf (gguf:DIST: the GGUF file a package ships), "
        "prune:<teacher>:<layers> (teacher layers kept, e.g. 0-3,8)",
    )
    teacher: str = Field("builtin:add:teacher", description="same forms as model.student")
    tokenizer: str | None = Field(None, description="tokenizer to use (default: the student's)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a CUDA GPU that supports it, else float32"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")


class TaskConfig(_Section):
    name: str = Field(
        "add",
        description="add, copy, reverse, chain; file, jsonl:PATH, parquet:PATH, csv:PATH, hf:PATH; "
        "reasoning_gym:NAME[,NAME...]; humaneval",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="task options, e.g. {digits: 3} or {path: x.jsonl, verifier: math}",
    )
    system_prompt: str | None = Field(
        None, description="system message rendered before each prompt (chat template)"
    )


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, gt=0, description="prompts per optimizer step")
    samples_per_prompt: int = Field(4, gt=0, description="rollouts per prompt")
    max_new_tokens: int = Field(16, gt=0, description="L_0: response budget (prefix included)")
    temperature: float = Field(1.0, gt=0, description="student sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="student nucleus sampling")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="student sampler: hf (generate) or vllm (extra vllm, CUDA)"
    )
    vllm_memory: float = Field(
        0.3, gt=0, lt=1, description="engine vllm: share of GPU memory vLLM may take"
    )


GUIDANCE_DEFAULTS: dict[str, Any] = {
    "schedule": "cosine",
    "prefix": "cap",
    "guided_fraction": 1.0,
    "full_prefix": False,
}
"""What a null `guidance.*` setting means when the objective has no default of its own."""


class GuidanceConfig(_Section):
    enabled: bool | None = Field(
        None, description="teacher prefixes; null: on for objectives that use them (tropd)"
    )
    schedule: Literal["cosine", "constant"] | None = Field(
        None,
        description="prefix cap L_max over steps: cosine from L_0 to 0, or constant L_0; "
        "null: the objective's (seqkd: constant), else cosine",
    )
    prefix: Literal["cap", "uniform"] | None = Field(
        None,
        description="cap: l = min(|y_T|, L_max); uniform: l ~ U[0, min(|y_T|, L_max)]; "
        "null: the objective's (tropd: uniform), else cap",
    )
    guided_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of each prompt's rollouts that get a prefix; "
        "null: the objective's (tropd: 0.5), else 1",
    )
    temperature: float = Field(1.0, gt=0, description="teacher sampling temperature")
    cap_unit: Literal["tokens", "fraction"] = Field(
        "fraction", description="L_0 and L_max as a share of each teacher response, or in tokens"
    )
    initial_cap: float | None = Field(
        None, gt=0, description="L_0; null: 1.0 (fraction) or rollout.max_new_tokens (tokens)"
    )
    full_prefix: bool | None = Field(
        None,
        description="a prefix may cover a whole teacher response (a fully off-policy, pure-SFT "
        "row); null: the objective's (seqkd: true), else false",
    )

    @model_validator(mode="after")
    def _fraction_cap_at_most_one(self) -> GuidanceConfig:
        if self.cap_unit == "fraction" and (self.initial_cap or 0) > 1:
            raise ValueError(
                "initial_cap is a share of the teacher's response with cap_unit fraction: "
                "use a value in (0, 1]"
            )
        return self


class TeacherConfig(_Section):
    top_k: int = Field(64, gt=0, description="k of the teacher's top-k log-probs (paper: 64)")
    chunk_size: int = Field(
        1024, gt=0, description="positions per chunk when scoring (bounds [chunk, V] memory)"
    )
    url: str | None = Field(
        None,
        description="teacher server (tropd serve-teacher, or OpenAI-compatible with teacher.api); "
        "null: load model.teacher in this process",
    )
    api: Literal["tropd", "openai"] = Field(
        "tropd", description="protocol of teacher.url: tropd serve-teacher, or openai (vLLM)"
    )
    token: SecretStr | None = Field(
        None, description="bearer token for teacher.url (default: $TROPD_TEACHER_TOKEN)"
    )
    token_file: str | None = Field(
        None, description="file holding the bearer token (used when teacher.token is null)"
    )
    timeout_s: float = Field(300.0, gt=0, description="seconds one teacher request may take")
    retries: int = Field(
        5, ge=0, description="retries of a failed teacher request (backoff 1 s, 2 s, 4 s, ...)"
    )


class ObjectiveConfig(_Section):
    name: str = Field("tropd", description="a method from `tropd objectives`")
    options: dict[str, Any] = Field(
        default_factory=dict, description="method options, e.g. {beta: 0.5, outlier: clip}"
    )


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="lr after warm-up: constant or cosine to 0"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0: no clipping)")
    micro_batch_size: int = Field(
        8, gt=0, description="sequences per forward/backward (gradient accumulation)"
    )
    head_chunk: int = Field(
        1024,
        ge=0,
        description="response positions per chunk of the student's LM head in the training "
        "forward, so no [B, T, V] logits exist; 0: plain full logits. Used when the objective "
        "and model allow it (see README, Performance)",
    )


class DistributedConfig(_Section):
    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="multi-process training (torchrun, --nproc): ddp replicates the student, "
        "fsdp2 shards it per decoder layer",
    )
    mixed_precision: bool = Field(
        False, description="fsdp2: bfloat16 compute and all-gathers, float32 gradient reduction"
    )
    timeout_s: int = Field(
        600, gt=0, description="seconds a process waits for the others before the run fails"
    )

    @model_validator(mode="after")
    def _mixed_precision_needs_fsdp2(self) -> DistributedConfig:
        if self.mixed_precision and self.strategy != "fsdp2":
            raise ValueError("mixed_precision needs strategy fsdp2 (DDP computes in model.dtype)")
        return self


class EvalConfig(_Section):
    every: int = Field(10, ge=0, description="evaluate every N steps and at step 0 (0: off)")
    num_prompts: int = Field(64, gt=0, description="held-out prompts (eval split)")
    temperature: float = Field(0.0, ge=0, description="sampling for accuracy (0: greedy)")
    samples: int = Field(
        1, ge=1, description="temperature-1 samples per prompt (sampled accuracy, reverse KL)"
    )
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollout.max_new_tokens")


class LoraConfig(_Section):
    enabled: bool = Field(False, description="train LoRA adapters on the student (needs peft)")
    rank: int = Field(16, gt=0, description="adapter rank r")
    alpha: float = Field(32.0, gt=0, description="adapter scale alpha (update = alpha/r * B A)")
    target_modules: list[str] | str = Field(
        "all-linear", description="module-name suffixes, e.g. [q_proj, v_proj], or all-linear"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")


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
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 1e-4, true, null, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=1e-4")
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
    one silently, so a setting written twice would be half-ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file path")
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            first = str(getattr(err, "problem", None) or str(err).splitlines()[0])
            raise ConfigError(f"{path}: not valid YAML{line} ({first})") from None
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


def config_reference() -> list[tuple[str, str, str]]:
    """(key path, default, meaning) for every setting, for the README and `tropd config`."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                rows.append(
                    (
                        prefix + name,
                        yaml.safe_dump(default, default_flow_style=True)
                        .strip()
                        .removesuffix("\n..."),
                        field.description or "",
                    )
                )

    walk(Config, "")
    return rows
