"""Typed run settings: YAML plus dotted `key.sub=value` overrides, validated on load.

Every mistake a user can make here (a typo in a key, a wrong type, an impossible value)
raises `ConfigError` with one line naming the key path and the fix, before any model
is loaded. The objective's name and options are checked where the run is built
(`tropd.train.loop.objective_from_config`), still before anything is written or loaded.
"""

from __future__ import annotations

import contextlib
import re
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


# Upper bounds: generous, but finite, so a typo like `run.steps=10**12` fails at load
# instead of drawing prompts or allocating for minutes before any work.
MAX_STEPS = 10_000_000
MAX_PROMPTS = 1_000_000  # prompts drawn up front: run.steps * prompts_per_step, eval.num_prompts
MAX_ROWS = 1_048_576  # sequences per step: prompts_per_step * samples_per_prompt
MAX_TOKENS = 1_048_576  # new tokens per response
MAX_SEED = 2**32 - 1
MAX_YAML_NODES = 100_000  # nodes of a config with every YAML alias expanded


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
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seeds sampling, the trust gate and data order"
    )
    steps: int = Field(
        50, gt=0, le=MAX_STEPS, description="optimizer steps S (also the guidance horizon)"
    )
    save_every: int = Field(10, ge=0, description="checkpoint every N steps (0: only the last)")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept on disk")
    log_samples: int = Field(2, ge=0, description="rollouts per step written to samples.jsonl")
    progress: bool = Field(True, description="show the rich progress bar")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers that also get every metric, the config and the "
        "samples (each an extra: pip install 'tropd[NAME]'); [] writes only metrics.jsonl",
    )
    project: str = Field(
        "tropd", min_length=1, description="the W&B / Trackio project and MLflow experiment"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        """`run.report_to=tensorboard` means `[tensorboard]`."""
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError(f"names a tracker twice: {value}; list each once")
        return value


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
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    autocast: Literal["none", "bf16"] = Field(
        "none",
        description="bf16: sampling, teacher scoring and the student's forward run their "
        "matmuls in bfloat16 (torch.autocast; CUDA, or a CPU with AVX512-BF16/AMX); the "
        "student's weights and optimizer stay in model.dtype (use float32), the frozen "
        "teacher is held in bfloat16",
    )

    cpu_matmul: Literal["auto", "torch", "onednn"] = Field(
        "auto",
        description="float32 linear layers on CPU: onednn (AVX-512 kernels; 2-4x torch's MKL "
        "on AMD CPUs), torch (its BLAS), auto: onednn on x86-64 where torch has it",
    )

    keep_freed_memory: bool | Literal["auto"] = Field(
        "auto",
        description="CPU runs: glibc's malloc keeps freed blocks up to 1 GiB for reuse instead "
        "of unmapping them (10-35% faster steps; the heap fragments, so peak RSS can rise by "
        "up to ~25%); auto: on unless a model's vocabulary matrix passes 128 MiB (where the "
        "fragmenting blocks are largest)",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError("use auto, cpu, cuda, cuda:N or mps")
        return device


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
    truncate_prompts: Literal["error", "left"] = Field(
        "error",
        description="a prompt too long for the model's positions (with rollout.max_new_tokens): "
        "error stops the run naming it; left drops its first tokens",
    )


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, gt=0, le=MAX_ROWS, description="prompts per optimizer step")
    samples_per_prompt: int = Field(4, gt=0, le=MAX_ROWS, description="rollouts per prompt")
    max_new_tokens: int = Field(
        16, gt=0, le=MAX_TOKENS, description="L_0: response budget (prefix included)"
    )
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
        description="share of the step's rollouts that get a prefix, spread evenly over prompts; "
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
    write_ahead: int = Field(
        2,
        ge=1,
        le=64,
        description="steps whose prefixes the frozen teacher writes in one batched loop (their "
        "prompts are known ahead; a loop's cost hardly grows with its rows); 1: each step its own",
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
    top_k: int = Field(
        64, gt=0, le=MAX_TOKENS, description="k of the teacher's top-k log-probs (paper: 64)"
    )
    chunk_size: int = Field(
        1024,
        gt=0,
        le=MAX_TOKENS,
        description="positions per chunk when scoring (bounds [chunk, V] memory; fewer where "
        "a chunk's fp32 logits would pass 64 MiB)",
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
    timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="seconds one teacher request may take"
    )
    retries: int = Field(
        5,
        ge=0,
        le=100,
        description="retries of a failed teacher request (backoff 1 s, 2 s, 4 s, ...)",
    )


class ObjectiveConfig(_Section):
    name: str = Field("tropd", description="a method from `tropd objectives`")
    options: dict[str, Any] = Field(
        default_factory=dict, description="method options, e.g. {beta: 0.5, outlier: clip}"
    )


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
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
    max_skipped_steps_in_row: int = Field(
        10,
        gt=0,
        description="stop the run (exit 1) after this many steps in a row skipped as "
        "non-finite; the last checkpoint stays",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each AdamW beta must be in [0, 1), e.g. [0.9, 0.999]")
        return betas


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
        600,
        gt=0,
        le=604_800,
        description="seconds a process waits for the others before the run fails",
    )

    @model_validator(mode="after")
    def _mixed_precision_needs_fsdp2(self) -> DistributedConfig:
        if self.mixed_precision and self.strategy != "fsdp2":
            raise ValueError("mixed_precision needs strategy fsdp2 (DDP computes in model.dtype)")
        return self


class EvalConfig(_Section):
    every: int = Field(10, ge=0, description="evaluate every N steps and at step 0 (0: off)")
    num_prompts: int = Field(64, gt=0, le=MAX_PROMPTS, description="held-out prompts (eval split)")
    temperature: float = Field(0.0, ge=0, description="sampling for accuracy (0: greedy)")
    samples: int = Field(
        1,
        ge=1,
        le=MAX_ROWS,
        description="temperature-1 samples per prompt (sampled accuracy, reverse KL)",
    )
    max_new_tokens: int | None = Field(
        None, gt=0, le=MAX_TOKENS, description="default: rollout.max_new_tokens"
    )


class LoraConfig(_Section):
    enabled: bool = Field(False, description="train LoRA adapters on the student (needs peft)")
    rank: int = Field(16, gt=0, le=65_536, description="adapter rank r")
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

    @model_validator(mode="after")
    def _feasible_sizes(self) -> Config:
        """Products of bounded values that are drawn or held at once."""
        r = self.rollout
        if self.run.steps * r.prompts_per_step > MAX_PROMPTS:
            raise ValueError(
                f"run.steps * rollout.prompts_per_step is {self.run.steps * r.prompts_per_step} "
                f"prompts, drawn before the run starts; keep it <= {MAX_PROMPTS}"
            )
        if r.prompts_per_step * r.samples_per_prompt > MAX_ROWS:
            raise ValueError(
                "rollout.prompts_per_step * rollout.samples_per_prompt is "
                f"{r.prompts_per_step * r.samples_per_prompt} sequences per step; "
                f"keep it <= {MAX_ROWS}"
            )
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 1e-4, true, null, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=1e-4")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw else ""
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({_problem(err)})"
        ) from None
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
    one silently, so a setting written twice would be half-ignored), a recursive alias, and
    a document of more than `MAX_YAML_NODES` nodes once its aliases are expanded (an
    "anchor bomb": a few lines of aliases that expand to billions of values)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_nodes(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: SafeLoader says so
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_nodes(node: yaml.Node, counted: dict[int, int], open_: set[int]) -> int:
    """Nodes under `node` with aliases expanded; each shared node is counted once per use
    but walked once (`counted`), so a bomb is measured without being expanded."""
    if id(node) in open_:
        raise yaml.constructor.ConstructorError(
            None, None, "recursive alias (an anchor used inside itself)", node.start_mark
        )
    if id(node) not in counted:
        open_.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        counted[id(node)] = 1 + sum(_expanded_nodes(c, counted, open_) for c in children)
        open_.discard(id(node))
        if counted[id(node)] > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"more than {MAX_YAML_NODES} values once aliases are expanded "
                "(an alias bomb?); write the config without deep aliases",
                node.start_mark,
            )
    return counted[id(node)]


def _problem(err: Exception) -> str:
    """The first line of a YAML error, or what a too-deep document is."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(getattr(err, "problem", None) or str(err).splitlines()[0])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass a YAML file path")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ConfigError(
                f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the config as UTF-8"
            ) from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except (yaml.YAMLError, RecursionError) as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{line} ({_problem(err)})") from None
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
        given = first.get("input")
        if isinstance(given, dict):  # a whole section: its key names it already
            raise ConfigError(f"{where}: {message}") from None
        shown = repr(given)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ConfigError(f"{where}: {message} (got {shown})") from None


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
