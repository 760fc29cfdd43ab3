"""The on-policy distillation loop: rollout -> teacher scoring -> objective -> step.

Reads top to bottom like the algorithm; the plumbing (models, checkpoints, metric
files, progress) lives in small helpers below `train`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch, align_logits
from tropd.config import GUIDANCE_DEFAULTS, Config, ConfigError, TaskConfig, save_config
from tropd.head import (
    HeadLogits,
    autocast_dtype,
    chunked_head_supported,
    last_hidden_states,
    sharable_columns,
)
from tropd.kernels import keep_freed_memory, use_onednn
from tropd.lora import apply_lora, merge_lora
from tropd.model_names import (
    load_model,
    load_tokenizer,
    read_max_positions,
    read_vocab_size,
    resolve_model_path,
)
from tropd.models import forward_precision, native_bf16
from tropd.objectives import Objective, OptionError, get_objective, list_objectives
from tropd.rollout import (
    GuidancePlan,
    HFEngine,
    SamplingParams,
    Written,
    collect_rollouts,
    prefix_cap,
    teacher_request,
    write_prefixes,
)
from tropd.rollout.blend import BlendEngine, blend_budget
from tropd.rollout.engine import is_sharded
from tropd.rollout.vllm_engine import VLLMEngine
from tropd.tasks import get_task
from tropd.tasks.chat import encode_prompt
from tropd.teacher import score_batch
from tropd.teacher.remote import RemoteTeacher, connect_teacher
from tropd.train import distributed, shutdown, trackers
from tropd.train.checkpoint import list_checkpoints
from tropd.train.heldout import heldout_metrics
from tropd.train.progress import Progress


@dataclass
class Setup:
    """Everything a run holds between steps."""

    config: Config
    run_dir: Path
    student: Any
    teacher: Any
    tokenizer: Any
    task: Any
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_items: list
    train_prompts: list[list[int]]
    eval_items: list
    eval_prompts: list[list[int]]
    student_ddp: Any = None  # multi-process DDP runs: the wrapper training forwards go through
    chunked_head: bool = False  # training forwards use `HeadLogits` (see `student_logits`)
    sampler: str = "hf"  # what samples the student, for the whole run: hf | vllm | blend
    vllm: Any = None  # sampler vllm: the engine, with its own copy of the weights
    guidance: dict[str, Any] | None = None  # `guidance_settings`, resolved once per run
    written: dict[int, Written | None] = field(default_factory=dict)  # `written_ahead`


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (e.g. too many non-finite steps in a row); the message
    is one line saying why and what to change."""


def train(config: Config, resume: bool = False, rank: int = 0, world_size: int = 1) -> Path:
    """Run (or resume) training as configured; returns the run directory.

    `rank`/`world_size` select this process's shard of each step's prompts. The run holds
    its folder's lock throughout; SIGTERM or SIGINT ends it after the step in progress and
    its checkpoint with `RunStopped` (`tropd.train.shutdown`).
    """
    objective_from_config(config)  # a bad objective stops the run before its folder exists
    trackers.check_installed(config.run.report_to)  # so does a tracker that is not installed
    run_dir = Path(config.run.output_dir)
    with shutdown.run_dir_lock(run_dir), shutdown.stop_signals() as stop:
        return train_locked(config, resume, rank, world_size, stop)


def train_locked(
    config: Config, resume: bool, rank: int, world_size: int, stop: shutdown.StopRequest
) -> Path:
    """`train` once the run folder is locked; `stop` says whether a signal asked to stop."""
    run_dir = prepare_run_dir(config, resume)
    setup = build(config, run_dir)
    start, skipped = 0, 0
    if resume and (checkpoints := list_checkpoints(run_dir)):
        state = distributed.load_checkpoint(
            checkpoints[-1], setup.student, setup.optimizer, setup.scheduler
        )
        start, skipped = state["step"], state["skipped_steps"]
    main = rank == 0  # writes the logs; every rank trains
    if main:
        # Without a checkpoint, step 0's evaluation runs again: its old line goes too.
        truncate_jsonl(run_dir / "metrics.jsonl", start if start else -1)
        truncate_jsonl(run_dir / "samples.jsonl", start)
    in_row = 0  # steps skipped as non-finite since the last good one
    cfg = config.run
    with (
        Progress(cfg.steps, enabled=cfg.progress and main, start=start) as progress,
        trackers.tracking(config, run_dir, start, enabled=main) as track,
    ):
        if start == 0 and config.eval.every:
            evaluation = {"step": 0, **run_eval(setup)}
            if main:
                write_jsonl(run_dir / "metrics.jsonl", evaluation)
                track(evaluation, [])
        for step in range(start + 1, cfg.steps + 1):
            seed_everything(cfg.seed, step, rank)
            record = train_step(setup, step, rank, world_size)
            skipped += int(record["skipped"])
            record["skipped_steps"] = skipped
            if config.eval.every and (step % config.eval.every == 0 or step == cfg.steps):
                record.update(run_eval(setup))
            samples = [{"step": step, **sample} for sample in record.pop("samples")]
            if main:
                write_jsonl(run_dir / "metrics.jsonl", record)
                for sample in samples:
                    write_jsonl(run_dir / "samples.jsonl", sample)
                track(record, samples)
            progress.update(step, record)
            # Every rank learns whether any got a signal, so all stop after the same step.
            stopping = step < cfg.steps and distributed.any_rank(stop.signal is not None)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
                saved = distributed.save_checkpoint(
                    run_dir,
                    step,
                    setup.student,
                    setup.optimizer,
                    setup.scheduler,
                    {
                        "skipped_steps": skipped,
                        "data_position": step * config.rollout.prompts_per_step,
                    },
                    cfg.keep_checkpoints,
                )
            if stopping:
                raise shutdown.RunStopped(
                    stop.signal or "another process got a signal", step, saved
                )
            in_row = in_row + 1 if record["skipped"] else 0
            if in_row >= config.optim.max_skipped_steps_in_row:
                raise TrainingStopped(
                    f"steps {step - in_row + 1}-{step} were all skipped (non-finite loss or "
                    f"gradient), so {run_dir} stopped with its last checkpoint kept; lower "
                    "optim.lr or check the data, then --resume (optim.max_skipped_steps_in_row "
                    "sets how many in a row stop a run)"
                )
    export_final(setup)
    return run_dir


def train_step(setup: Setup, step: int, rank: int, world_size: int) -> dict[str, Any]:
    """One optimizer step. Returns the metrics record (with `samples` for the log)."""
    config, student = setup.config, setup.student
    tic = time.perf_counter()
    prompts = prompts_for_step(
        setup.train_prompts, step, config.rollout.prompts_per_step, rank, world_size
    )
    prompt_items = prompts_for_step(
        setup.train_items, step, config.rollout.prompts_per_step, rank, world_size
    )
    autocast = config.model.autocast
    with forward_precision(autocast, device_of(student)):
        batch, cap = rollout(setup, prompts, step, rank, world_size)
    if setup.objective.needs_reward:
        batch = batch.replace(reward=verify(setup, batch, prompt_items))
    generated = time.perf_counter()
    with forward_precision(autocast, device_of(student)):
        batch = score_teacher(setup, batch)
    scored = time.perf_counter()

    student.train()
    setup.optimizer.zero_grad(set_to_none=True)
    # Token means are global: divide by the count over all ranks (see train/distributed.py).
    denominator = distributed.all_reduce_sum(setup.objective.denominator(batch))
    prefix_denominator = (  # a second count only when the prefix loss is its own mean
        distributed.all_reduce_sum(setup.objective.prefix_denominator(batch))
        if setup.objective.separate_prefix
        else None
    )
    gate = torch.Generator().manual_seed(config.run.seed * 1_000_003 + step * world_size + rank)
    forward = setup.student_ddp if setup.student_ddp is not None else student
    size = config.optim.micro_batch_size
    losses, parts = [], []  # parts: each micro-batch's (metrics, weights)
    for begin in range(0, len(batch), size):
        micro = batch.select(slice(begin, begin + size)).trim()
        with forward_precision(autocast, device_of(student)):
            logits = student_logits(setup, forward, micro)
        out = setup.objective(
            logits,
            micro,
            denominator=denominator,
            prefix_denominator=prefix_denominator,
            generator=gate,
            step=step,
        )
        losses.append(out.loss.detach())
        if not torch.isfinite(out.loss) and world_size == 1:
            break  # the step is skipped; several ranks go on in step and all skip it together
        # DDP and FSDP2 average gradients over ranks; undo that to get the global sum.
        (out.loss * world_size).backward()
        parts.append((out.metrics, out.weights))
    loss = distributed.all_reduce_sum(float(torch.stack(losses).sum()))
    trained = time.perf_counter()
    # A tied embedding looked up with a sparse gradient (`sparse_lookup`) ends dense when the
    # head's gradient reached it, as every loss through the head does; a loss that reached
    # only the lookup would leave it sparse, which clipping and fused AdamW do not take.
    embedding = student.get_input_embeddings().weight
    if embedding.grad is not None and embedding.grad.is_sparse:
        embedding.grad = embedding.grad.to_dense()
    clip = config.optim.grad_clip or math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), clip))
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if skipped:  # no gradients: the optimizer step below changes no weight and no state
        setup.optimizer.zero_grad(set_to_none=True)
    # Always stepped, in this order, so the schedule follows the step number whether or not
    # earlier steps were skipped (and torch sees no scheduler step before an optimizer step).
    setup.optimizer.step()
    setup.scheduler.step()
    # Gradients freed now, not at the next step's start: the sampling and scoring phases
    # (the teacher's reordered weights, its caches) then reuse their memory.
    setup.optimizer.zero_grad(set_to_none=True)

    record: dict[str, Any] = {
        "step": step,
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": skipped,
    }
    record.update(combine_metrics([*parts, rollout_stats(batch)]))
    record["prefix_cap"] = cap
    record["lr"] = setup.scheduler.get_last_lr()[0]
    # Phase split: sampling (and the verifier), teacher scoring, student forward and
    # backward, optimizer (clipping, update, bookkeeping).
    record["time_generate_s"] = generated - tic
    record["time_teacher_s"] = scored - generated
    record["time_train_s"] = trained - scored
    record["time_rollout_s"] = scored - tic
    record["time_step_s"] = time.perf_counter() - tic
    record["time_optimizer_s"] = record["time_step_s"] - (trained - tic)
    record["samples"] = sample_log(batch, setup.tokenizer, config.run.log_samples)
    return record


def student_logits(setup: Setup, forward, micro: TokenBatch):
    """The student's logits for the objective: a `HeadLogits` (hidden states and the LM
    head, evaluated chunk by chunk at response positions) on the fast path, else the
    aligned `[B, T, V]` logits. The forward goes through `forward` (the DDP wrapper when
    there is one) either way. Under `model.autocast` the head's products run in bfloat16
    too (the objective itself runs outside autocast, in fp32)."""
    if not setup.chunked_head:
        out = forward(input_ids=micro.tokens, attention_mask=micro.attention_mask)
        return align_logits(out.logits)
    single = forward is setup.student and not is_sharded(setup.student)
    hidden = last_hidden_states(
        forward,
        micro.tokens,
        micro.attention_mask,
        shared_prompt(setup, forward, micro),
        sparse=single,
    )
    head = setup.student.get_output_embeddings()
    chunk = setup.config.optim.head_chunk
    low = autocast_dtype(hidden.device)
    return HeadLogits(hidden, head.weight, head.bias, micro.response_mask, chunk, low)


def shared_prompt(setup: Setup, forward, micro: TokenBatch) -> int:
    """Leading columns the micro-batch's rows all share (`shared_columns`: a system
    prompt, a chat template, the same prompt sampled several times), run once in the
    training forward (`sharable_columns`); 0 through a DDP/FSDP wrapper."""
    if forward is not setup.student or is_sharded(setup.student):
        return 0
    return sharable_columns(setup.student, micro.tokens, micro.attention_mask)


def rollout(
    setup: Setup, prompts: list[list[int]], step: int, rank: int = 0, world_size: int = 1
) -> tuple[TokenBatch, float]:
    """Sample this step's responses, with teacher prefixes when guidance is on.
    Returns the batch and the prefix cap used (0 without guidance)."""
    config = setup.config
    r, g = config.rollout, config.guidance
    plan = guidance_plan(setup, step)
    written = None
    if plan is not None and g.write_ahead > 1:
        written = written_ahead(setup, step, rank, world_size)
    batch = collect_rollouts(
        student_engine(setup, step),
        prompts,
        SamplingParams(r.max_new_tokens, r.temperature, r.top_p),
        r.samples_per_prompt,
        setup.tokenizer.pad_token_id,
        teacher=teacher_engine(setup) if plan is not None else None,
        guidance=plan,
        rng=step_rng(config, step, rank, world_size),
        written=written,
    )
    return batch, plan.cap if plan is not None else 0.0


def guidance_plan(setup: Setup, step: int) -> GuidancePlan | None:
    """What the teacher writes at `step` (its prefix cap from the schedule); None without
    guidance."""
    config = setup.config
    g, setting = config.guidance, setup.guidance
    if not (g.enabled if g.enabled is not None else setup.objective.wants_guidance):
        return None
    relative = g.cap_unit == "fraction"
    initial = g.initial_cap or (1.0 if relative else config.rollout.max_new_tokens)
    cosine = setting["schedule"] == "cosine"
    return GuidancePlan(
        prefix_cap(step - 1, config.run.steps, initial) if cosine else initial,
        setting["prefix"],
        setting["guided_fraction"],
        g.temperature,
        relative,
        setting["full_prefix"],
    )


def step_rng(config: Config, step: int, rank: int, world_size: int) -> random.Random:
    """The draws of a step's guidance (which rollouts get a prefix, how long)."""
    return random.Random(config.run.seed * 7919 + step * world_size + rank)


def written_ahead(setup: Setup, step: int, rank: int, world_size: int) -> Written | None:
    """This rank's teacher responses for `step`'s guided rollouts. The teacher is frozen and
    every step's prompts are known ahead, so it writes those of `guidance.write_ahead`
    steps (`step`'s group: steps `k*n+1 .. k*n+n`) in one loop (`write_prefixes`), the
    first time one of them is asked for; the others wait in `setup.written`. The loop
    samples from its own seed (the group's and rank's) and leaves the global generator as
    it was, so a run resumed inside a group writes it again exactly as before."""
    if step not in setup.written:
        config = setup.config
        r, n = config.rollout, config.guidance.write_ahead
        first = (step - 1) // n * n + 1
        group = range(first, min(first + n, config.run.steps + 1))
        params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
        requests = {}
        for s in group:
            prompts = prompts_for_step(setup.train_prompts, s, r.prompts_per_step, rank, world_size)
            rng = step_rng(config, s, rank, world_size)
            request = teacher_request(
                prompts, r.samples_per_prompt, params, guidance_plan(setup, s), rng
            )
            if request is not None:
                requests[s] = request
        device = device_of(setup.teacher) if isinstance(setup.teacher, torch.nn.Module) else None
        cuda = [device] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(config.run.seed * 1_000_033 + first * 101 + rank)
            written = (
                write_prefixes(teacher_engine(setup), [*requests.values()]) if requests else []
            )
        parts = dict(zip(requests, written, strict=True))
        # Steps before `step` (a run resumed inside the group) were written only so the loop
        # holds the rows it held the first time.
        setup.written = {s: parts.get(s) for s in group if s >= step}
    return setup.written.pop(step, None)


def student_engine(setup: Setup, step: int):
    """The engine that samples the student at `step`, of the kind chosen once for the run
    (`Setup.sampler`)."""
    pad, eos = setup.tokenizer.pad_token_id, setup.tokenizer.eos_token_id
    if setup.sampler == "blend":
        o = setup.objective.options
        epsilon = blend_budget(step - 1, o["kl_budget"], o["warmup_steps"])
        return BlendEngine(setup.student, setup.teacher, epsilon, pad, eos)
    if setup.sampler == "vllm":  # vLLM samples from its own copy: bring it up to date
        setup.vllm.push_weights(distributed.full_parameters(setup.student))
        return setup.vllm
    return HFEngine(setup.student, pad, eos)


def guidance_settings(config: Config, objective: Objective) -> dict[str, Any]:
    """The `guidance.*` settings of `GUIDANCE_DEFAULTS` for this run: the config's where
    set, else the objective's own default, else the general one."""
    own = objective.guidance_defaults
    return {
        key: value
        if (value := getattr(config.guidance, key)) is not None
        else own.get(key, default)
        for key, default in GUIDANCE_DEFAULTS.items()
    }


def score_teacher(setup: Setup, batch: TokenBatch) -> TokenBatch:
    """The teacher's log-prob at every response token, and its top-k and entropy where the
    objective reads them, from the local model or the teacher server (`teacher.url`)."""
    t, objective = setup.config.teacher, setup.objective
    top_k = t.top_k if objective.teacher_topk else 0
    if isinstance(setup.teacher, RemoteTeacher):
        scored = setup.teacher.score_batch(batch, top_k, objective.teacher_entropy)
    else:  # on the teacher's device, back on the batch's (the student's)
        scored = score_batch(setup.teacher, batch, top_k, t.chunk_size, objective.teacher_entropy)
    return scored.to(device_of(setup.student))


def teacher_engine(setup: Setup):
    """What writes the teacher prefixes: the teacher server, or `generate` on the model."""
    if isinstance(setup.teacher, RemoteTeacher):
        return setup.teacher
    return HFEngine(setup.teacher, setup.tokenizer.pad_token_id, setup.tokenizer.eos_token_id)


def verify(setup: Setup, batch: TokenBatch, items: list) -> torch.Tensor:
    """`[B]` task reward of each rollout (teacher prefix + student part) from the verifier."""
    per_row = [items[int(g)] for g in batch.group]
    texts = [
        setup.tokenizer.decode(
            batch.tokens[i][batch.response_mask[i]].tolist(), skip_special_tokens=True
        )
        for i in range(len(batch))
    ]
    return torch.tensor([setup.task.score(t, item) for t, item in zip(texts, per_row, strict=True)])


def run_eval(setup: Setup) -> dict[str, float]:
    """Evaluate with a fixed seed (same sampling noise at every evaluation), leaving the
    training RNG untouched."""
    e, tok = setup.config.eval, setup.tokenizer
    with torch.random.fork_rng(devices=[]), distributed.gathered_root(setup.student):
        torch.manual_seed(setup.config.run.seed)
        return heldout_metrics(
            setup.student,
            None if isinstance(setup.teacher, RemoteTeacher) else setup.teacher,
            HFEngine(setup.student, tok.pad_token_id, tok.eos_token_id),
            tok,
            setup.task,
            setup.eval_items,
            setup.eval_prompts,
            e.max_new_tokens or setup.config.rollout.max_new_tokens,
            e.temperature,
            setup.config.teacher.chunk_size,
            e.samples,
        )


# --- setup ------------------------------------------------------------------------


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """`make_run_dir`, a directory that cannot be made (under a file, a name too long,
    no permission) a one-line `ConfigError`."""
    try:
        return make_run_dir(config, resume)
    except OSError as err:
        raise ConfigError(
            f"run.output_dir {config.run.output_dir!r}: cannot write there ({err.strerror}); "
            "choose another run.output_dir"
        ) from None


def make_run_dir(config: Config, resume: bool) -> Path:
    """Create the run directory; refuse to overwrite a previous run unless resuming."""
    run_dir = Path(config.run.output_dir)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run.output_dir {str(run_dir)!r} already holds a run; pass --resume to continue it "
            "or choose another run.output_dir"
        )
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return run_dir


def objective_from_config(config: Config) -> Objective:
    """The objective `config.objective` names. A bad name or option is a `ConfigError` that
    names its key (`objective.name`, `objective.options.<option>`), raised before any model
    loads."""
    name, options = config.objective.name, config.objective.options
    if name not in list_objectives():
        raise ConfigError(
            f"objective.name: unknown objective; valid: {', '.join(list_objectives())} "
            f"(got {name!r})"
        )
    try:
        return get_objective(name, **options)
    except OptionError as err:
        raise ConfigError(f"objective.options.{err.option}: {err}") from None


def check_models(config: Config) -> None:
    """Checks that need the models' configs (not their weights). A teacher server is
    checked against the student's tokenizer when the run connects to it."""
    check_response_budget(config)
    if config.teacher.url:
        return
    vocab_student = _vocab_size(config.model.student, "model.student")
    vocab_teacher = _vocab_size(config.model.teacher, "model.teacher")
    if vocab_student != vocab_teacher:
        raise ConfigError(
            f"model.teacher: vocabulary size {vocab_teacher} differs from model.student's "
            f"{vocab_student}; on-policy distillation needs a shared tokenizer"
        )
    if config.teacher.top_k > vocab_teacher:
        raise ConfigError(
            f"teacher.top_k: {config.teacher.top_k} exceeds the vocabulary size {vocab_teacher}; "
            f"set teacher.top_k <= {vocab_teacher}"
        )


def check_response_budget(config: Config) -> None:
    """The longest response must leave room for a prompt in each local model's positions
    (`max_position_embeddings`, where its config says); the prompts themselves are checked
    once the tokenizer is loaded (`fit_prompts`)."""
    key = "rollout.max_new_tokens"
    budget = config.rollout.max_new_tokens
    if (config.eval.max_new_tokens or 0) > budget:
        key, budget = "eval.max_new_tokens", config.eval.max_new_tokens
    names = [config.model.student] + ([] if config.teacher.url else [config.model.teacher])
    for name in names:
        positions = read_max_positions(name)
        if positions is not None:
            fit_prompts([], [], positions, budget, key, config.task)


def _vocab_size(name: str, key: str) -> int:
    """`read_vocab_size`, its error naming the config key that holds the model name."""
    try:
        return read_vocab_size(name)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


KEEP_FREED_AUTO_LIMIT = 128 * 2**20


def keeps_freed_memory(setting: bool | str, models: list) -> bool:
    """`model.keep_freed_memory` for these models: auto keeps freed memory unless one of
    their vocabulary matrices (input embedding or LM head) passes `KEEP_FREED_AUTO_LIMIT`.
    Blocks that size (the matrix's gradient, its copies) are the ones the kept heap
    fragments around: at vocabulary 151936 (a 297 MiB teacher head) peak RSS rose ~25%
    with it on, while with it off steps stayed within the speed targets
    (`bench/throughput.py`)."""
    if setting != "auto":
        return bool(setting)
    return all(vocabulary_bytes(model) <= KEEP_FREED_AUTO_LIMIT for model in models)


def vocabulary_bytes(model) -> int:
    """Bytes of `model`'s largest vocabulary matrix (input embedding or LM head)."""
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    return max(
        (
            layer.weight.numel() * layer.weight.element_size()
            for layer in layers
            if layer is not None
        ),
        default=0,
    )


def build(config: Config, run_dir: Path) -> Setup:
    objective = objective_from_config(config)
    check_models(config)
    task = get_task(config.task.name, **config.task.options)
    m = config.model
    student = load_model(m.student, m.dtype, m.device)
    if m.autocast == "bf16" and not native_bf16(device_of(student)):
        warnings.warn(
            "model.autocast: bf16 on a device without bf16 matrix units (AVX512-BF16/AMX, or "
            "a bf16 GPU) is emulated and slower than float32; set model.autocast=none",
            stacklevel=2,
        )
    if config.lora.enabled:
        lora = config.lora
        apply_lora(student, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
    if not (distributed.is_distributed() and config.distributed.strategy == "fsdp2"):
        use_onednn(student, m.cpu_matmul)
    student_ddp = distributed.parallelize(student, config.distributed)
    tokenizer = load_tokenizer(m.tokenizer or m.student)
    sampler = choose_sampler(config, objective)
    vllm = None
    if sampler == "vllm":
        if config.lora.enabled:
            raise ConfigError("rollout.engine: vllm takes no LoRA weights; use hf or no LoRA")
        path = resolve_model_path(m.student)
        memory = config.rollout.vllm_memory
        vllm = VLLMEngine(path, tokenizer.eos_token_id, memory, m.dtype, config.run.seed)
    if config.teacher.url:
        if objective.blended_rollout:
            raise ConfigError(
                f"teacher.url: objective {objective.name} samples from the teacher's logits "
                "during generation, which needs a local teacher; unset teacher.url"
            )
        teacher = connect_teacher(config.teacher, m.teacher, tokenizer)
    else:
        # Under bf16 autocast every product would round the frozen teacher's weights to
        # bf16 anyway; holding them so saves that cast at each forward (a decoding step's
        # cost would double: autocast caches casts only of weights that train).
        dtype = "bfloat16" if m.autocast == "bf16" else m.dtype
        teacher = load_model(m.teacher, dtype, m.device)
        teacher.requires_grad_(False).eval()
        use_onednn(teacher, m.cpu_matmul)
    local = [student] + ([] if config.teacher.url else [teacher])
    if device_of(student).type == "cpu" and keeps_freed_memory(m.keep_freed_memory, local):
        keep_freed_memory()
    o = config.optim
    trained = [p for p in student.parameters() if p.requires_grad]
    # One fused kernel over all tensors (several times faster than the per-tensor loop on
    # CPU); sharded (DTensor) parameters keep the default implementation.
    fused = not is_sharded(student) and all(p.is_floating_point() for p in trained)
    optimizer = torch.optim.AdamW(
        trained,
        lr=o.lr,
        betas=o.betas,
        weight_decay=o.weight_decay,
        fused=fused or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, config.run.steps, o.schedule)
    )
    seed = config.run.seed
    r = config.rollout
    train_items = task.items("train", config.run.steps * r.prompts_per_step, seed)
    eval_items = task.items("eval", config.eval.num_prompts, seed)

    positions = min(
        getattr(model.config, "max_position_embeddings", None) or math.inf
        for model in (student, teacher)
        if not isinstance(model, RemoteTeacher)
    )

    def encode(items: list, budget: int, budget_key: str) -> list[list[int]]:
        prompts = [encode_prompt(tokenizer, item, config.task.system_prompt) for item in items]
        return fit_prompts(prompts, items, positions, budget, budget_key, config.task)

    chunked = (
        config.optim.head_chunk > 0
        and objective.chunked_head
        and not is_sharded(student)
        and chunked_head_supported(student)
    )
    return Setup(
        config,
        run_dir,
        student,
        teacher,
        tokenizer,
        task,
        objective,
        optimizer,
        scheduler,
        train_items,
        encode(train_items, r.max_new_tokens, "rollout.max_new_tokens"),
        eval_items,
        encode(
            eval_items,
            config.eval.max_new_tokens or r.max_new_tokens,
            "eval.max_new_tokens" if config.eval.max_new_tokens else "rollout.max_new_tokens",
        ),
        student_ddp=student_ddp,
        sampler=sampler,
        vllm=vllm,
        chunked_head=chunked,
        guidance=guidance_settings(config, objective),
    )


def fit_prompts(
    prompts: list[list[int]],
    items: list,
    positions: float,
    budget: int,
    budget_key: str,
    task: TaskConfig,
) -> list[list[int]]:
    """`prompts` (token ids) with room for `budget` new tokens within the models'
    `positions`: a longer prompt loses its first tokens (`task.truncate_prompts: left`)
    or stops the run with one line naming it (`error`)."""
    room = positions - budget
    if room < 1:
        raise ConfigError(
            f"{budget_key}: {budget} new tokens leave no room for a prompt in the model's "
            f"{positions} positions (max_position_embeddings); lower it"
        )
    fitted = []
    for prompt, item in zip(prompts, items, strict=True):
        if len(prompt) > room and task.truncate_prompts == "error":
            raise ConfigError(
                f"task {task.name}: the prompt {item.prompt[:40]!r}... is {len(prompt)} "
                f"tokens, and with {budget_key} {budget} exceeds the model's {positions} "
                "positions; shorten it, lower the budget, or set task.truncate_prompts: left"
            )
        fitted.append(prompt[-int(room) :] if len(prompt) > room else prompt)
    return fitted


def choose_sampler(config: Config, objective: Objective) -> str:
    """What samples the student's rollouts, decided once per run: `blend` when the
    objective samples from the student-teacher blend (`BlendEngine`, whatever
    `rollout.engine` says), else `rollout.engine` (`hf` or `vllm`)."""
    return "blend" if objective.blended_rollout else config.rollout.engine


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def prompts_for_step(pool: list, step: int, per_step: int, rank: int, world_size: int) -> list:
    """The prompts of `step` (1-based) that belong to `rank`: the data position is
    `(step - 1) * per_step`, cycling through the pool; ranks take interleaved shares."""
    begin = (step - 1) * per_step
    chosen = [pool[(begin + i) % len(pool)] for i in range(per_step)]
    return chosen[rank::world_size]


def seed_everything(seed: int, step: int, rank: int) -> None:
    """Seed per step so a resumed run samples exactly what an uninterrupted one would."""
    torch.manual_seed(seed * 1_000_003 + step * 101 + rank)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def export_final(setup: Setup) -> None:
    """Save the student in Hugging Face format (written then renamed); LoRA adapters are
    merged into the weights first. With several processes all gather the full weights and
    rank 0 writes them."""
    final, tmp = setup.run_dir / "final", setup.run_dir / ".tmp_final"
    if setup.config.lora.enabled:
        merge_lora(setup.student)
    weights = distributed.full_state_dict(setup.student)
    if not distributed.is_main_process():
        return
    shutil.rmtree(tmp, ignore_errors=True)
    setup.student.save_pretrained(tmp, state_dict=weights)
    setup.tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


# --- metrics and logs ----------------------------------------------------------


def combine_metrics(parts: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """The step's metrics from the `(metrics, weights)` of every micro-batch on every process
    (see `ObjectiveOutput.weights`): each mean weighted by the tokens or rows it averages,
    each count summed, so they are those of one process holding the whole batch. A mean
    over nothing is 0. Collective: every process calls it, with the same keys."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight_of in parts:
        for key, value in metrics.items():
            weight = weight_of.get(key)
            if weight is None:  # a count
                sums[key] = sums.get(key, 0.0) + value
            else:
                sums[key] = sums.get(key, 0.0) + weight * value
                weights[key] = weights.get(key, 0.0) + weight
    sums, weights = distributed.sum_over_ranks(sums), distributed.sum_over_ranks(weights)
    means = {key: sums[key] / weight if weight else 0.0 for key, weight in weights.items()}
    return {**sums, **means}


def rollout_stats(batch: TokenBatch) -> tuple[dict[str, float], dict[str, float]]:
    """Response length, prefix length and the fully off-policy share, means over the batch's
    rows, with their weights (the row count) for `combine_metrics`."""
    prefix = batch.teacher_mask.sum(-1).float()
    student = batch.student_mask.sum(-1).float()
    stats = {
        "response_len": float((prefix + student).mean()),
        "prefix_len_mean": float(prefix.mean()),
        "off_policy_fraction": float(((prefix > 0) & (student == 0)).float().mean()),
    }
    return stats, dict.fromkeys(stats, float(len(batch)))


def sample_log(batch: TokenBatch, tokenizer, n: int) -> list[dict[str, Any]]:
    """The first `n` rollouts as text, split into prompt / teacher prefix / student part."""
    parts = {"prompt": PROMPT, "teacher_prefix": TEACHER, "student": STUDENT}
    out = []
    for row in range(min(n, len(batch))):
        real = batch.attention_mask[row].bool()
        out.append(
            {
                name: tokenizer.decode(
                    batch.tokens[row][real & (batch.origin[row] == code)].tolist()
                )
                for name, code in parts.items()
            }
        )
    return out


def write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (written after the checkpoint a resume starts from),
    and a last line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
