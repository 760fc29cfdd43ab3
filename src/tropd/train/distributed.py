"""Multi-process training: one process per device, started by torchrun.

`tropd train --nproc N CONFIG` (or `torchrun --nproc-per-node N -m tropd train CONFIG`)
runs N copies of the loop. Rank r samples, scores and trains on its share of each step's
prompts; the student is replicated (DDP) or sharded per decoder layer (FSDP2). The loss
equals one process's on the whole batch: every rank divides its token sum by the
all-ranks count (`all_reduce_sum` of the objective's denominator), and multiplies its loss
by the world size, because DDP and FSDP2 average gradients over ranks (sum / N).

Every function here is the single-process behaviour when no process group is up, so the
loop calls them unconditionally.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tropd.config import Config, ConfigError, DistributedConfig
from tropd.models import resolve_device
from tropd.train import checkpoint

PEER_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")
LAUNCHER_PID = "TROPD_LAUNCHER_PID"  # set by `launch` for the ranks it starts
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# torchrun's log messages (templates): a signal it got and passes on, a rank that failed
FORWARDING_NOTES = ("death signal, shutting down workers", "closing signal")
FAILED_NOTE = "failed (exitcode"


class RanksOutOfStep(RuntimeError):
    """Another process stopped answering; the message is one line naming the fix."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes logs, metrics and the export."""
    return not is_distributed() or dist.get_rank() == 0


@contextmanager
def process_group(config: Config) -> Iterator[tuple[int, int]]:
    """Join the process group torchrun describes in the environment; yields `(rank,
    world_size)`. Outside torchrun, or with one process, yields `(0, 1)` and starts
    nothing. NCCL when the model is on a GPU (rank on `cuda:LOCAL_RANK`), else gloo.

    A collective that waits longer than `distributed.timeout_s` (a rank crashed or hung)
    ends the run with `RanksOutOfStep` instead of a hang. The process dies with the one
    that started it (`die_with_launcher`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1
        return
    die_with_launcher()
    check_world_size(config, world_size)
    device = resolve_device(config.model.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout_s = config.distributed.timeout_s
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    try:
        yield rank, world_size
        dist.barrier()  # leave together: no rank tears down while another still talks
    except BaseException as err:
        release_frames(err)
        # gloo and NCCL report lost peers as RuntimeError
        if not isinstance(err, RuntimeError) or not any(
            sign in str(err).lower() for sign in PEER_LOST
        ):
            raise
        raise RanksOutOfStep(
            f"rank {rank}: another process did not answer within distributed.timeout_s="
            f"{timeout_s} s (it crashed or hung; its log says which); raise the timeout "
            "if a step legitimately keeps ranks apart longer"
        ) from None
    finally:
        dist.destroy_process_group()


def release_frames(err: BaseException) -> None:
    """Drop the local variables of the frames `err` (and the exceptions it chains) went
    through. A DDP wrapper left in them (the trainer's, on RunStopped or an error) holds the
    process group: freed after `destroy_process_group`, its C++ reducer drops the group's last
    reference with the GIL held, and the gloo group's destructor then waits for its worker
    thread, which may be waiting for the GIL to free a finished collective's tensors. That
    deadlock left a rank hung after its checkpoint (its launcher waited `--shutdown-timeout`).
    Freed here, while the group is up (cycles included: the collector runs now, not at some
    later allocation), the wrapper takes no group down with it."""
    while err is not None:
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()


def check_world_size(config: Config, world_size: int) -> None:
    """Settings that must agree with the number of processes, checked before any model loads."""
    per_step = config.rollout.prompts_per_step
    if per_step % world_size:
        raise ConfigError(
            f"rollout.prompts_per_step: {per_step} prompts do not split evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    if config.model.device.startswith("cuda:"):
        raise ConfigError(
            f"model.device: {config.model.device} would put every process on one GPU; use "
            "auto or cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if resolve_device(config.model.device).type == "cuda" and local_rank >= gpus:
        raise ConfigError(
            f"model.device: {config.model.device}: process LOCAL_RANK={local_rank} has no GPU "
            f"of its own on this machine ({gpus} CUDA device(s)); start at most {gpus} "
            f"processes per machine (torchrun --nproc-per-node={gpus}) or set model.device=cpu"
        )


def parallelize(student: torch.nn.Module, settings: DistributedConfig) -> Any:
    """Prepare the student for multi-process training; call before building the optimizer.

    DDP: returns the `DistributedDataParallel` wrapper that training forwards must go
    through (generation and evaluation use the student itself). FSDP2: shards each decoder
    layer, then the root, in place (optionally bf16 compute with fp32 gradient reduction)
    and returns None. A single process: returns None and changes nothing.
    """
    if not is_distributed():
        return None
    device = next(student.parameters()).device
    if settings.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if settings.mixed_precision
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(student):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(student, mesh=mesh, mp_policy=policy)
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model: the modules its `_no_split_modules`
    names (e.g. `LlamaDecoderLayer`), which FSDP2 shards one by one."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layers (_no_split_modules) to shard; "
            "use distributed.strategy=ddp"
        )
    return layers


@contextmanager
def gathered_root(model: torch.nn.Module) -> Iterator[None]:
    """Inside, an FSDP2 student's root parameters (embeddings, final norm, LM head) are
    whole, so code may call its submodules directly (`base_model`, the LM head), as the
    exact-KL evaluation does; the decoder layers gather themselves. Otherwise a no-op."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def all_reduce_sum(value: float) -> float:
    """Sum of `value` over all processes (the value itself in a single process)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total)


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over all processes, in one all-reduce (the values themselves in a
    single process). Every process must pass the same keys."""
    if not is_distributed():
        return values
    keys = sorted(values)
    packed = torch.tensor(
        [values[k] for k in keys], dtype=torch.float64, device=_collective_device()
    )
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist(), strict=True))


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every process (picklable; the value itself in a single process)."""
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any process (one all-reduce), so all take the same branch."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, whole tensor)` of every parameter, FSDP2 shards gathered (a collective per
    parameter, so every rank must iterate to the end)."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        yield name, (param.full_tensor() if isinstance(param, DTensor) else param.detach())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- checkpoints and export -----------------------------------------------------------


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int
) -> Path:
    """`checkpoint.save_checkpoint` in a single process. With several processes, a sharded
    checkpoint (torch.distributed.checkpoint): every rank writes its part of the model and
    optimizer state, rank 0 the scheduler and `state.json`, and renames the folder into
    place. No RNG state: every step reseeds from `run.seed`."""
    if not is_distributed():
        return checkpoint.save_checkpoint(run_dir, step, model, optimizer, scheduler, state, keep)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = is_main_process()
    staged = [checkpoint.staging_dir(run_dir, step) if main else None]
    dist.broadcast_object_list(staged, src=0)  # nobody writes before the folder exists
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staged[0])
    published = [None]
    if main:
        torch.save({"scheduler": scheduler.state_dict()}, staged[0] / "trainer.pt")
        published = [checkpoint.publish(staged[0], run_dir, step, state, keep)]
    dist.broadcast_object_list(published, src=0)  # the checkpoint is in place for everyone
    return published[0]


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore a checkpoint of either kind; returns its `state` with `step`. A sharded
    checkpoint loads onto any number of processes, one included (DCP reshards)."""
    if not (path / ".metadata").is_file():
        if is_distributed():
            raise ConfigError(
                f"{path} was written by a single-process run; resume it with one process "
                "(without torchrun or --nproc)"
            )
        return checkpoint.load_checkpoint(path, model, optimizer, scheduler)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    saved = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process: it warns that no process group is up
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(saved, checkpoint_id=path, no_dist=not is_distributed())
    set_state_dict(
        model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"]
    )
    scheduler.load_state_dict(torch.load(path / "trainer.pt", weights_only=False)["scheduler"])
    return json.loads((path / "state.json").read_text())


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole student's weights on rank 0's CPU, gathered from every rank (call on all
    ranks; the others get an empty dict). None in a single process: the model's own."""
    if not is_distributed():
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# --- launching ------------------------------------------------------------------------


def launch(nproc: int, tropd_args: list[str], grace_s: int) -> int | None:
    """Run `tropd <tropd_args>` in `nproc` processes on this machine with torchrun
    (`torch.distributed.run --standalone`). Returns the exit code of the first failed rank
    (0 when none failed), or None when SIGTERM or SIGINT stopped the launcher: torchrun
    passes the signal on to every rank (which finish the step and write a checkpoint), waits
    up to `grace_s` seconds for them, then kills those still running. Should the launcher
    itself be killed, the ranks die with it (`die_with_launcher`)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    for name in ("agent.server.api", "multiprocessing.api"):
        logging.getLogger(f"torch.distributed.elastic.{name}").addFilter(_not_said_by_the_ranks)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks inherit torchrun's environment
    try:
        torchrun(
            [
                "--standalone",
                f"--nproc-per-node={nproc}",
                f"--shutdown-timeout={grace_s}",
                "-m",
                "tropd",
                *tropd_args,
            ]
        )
    except ChildFailedError as err:
        first = min(err.failures)
        return err.failures[first].exitcode or 1
    except SignalException:
        return None
    finally:
        del os.environ[LAUNCHER_PID]
    return 0


def _not_said_by_the_ranks(record: logging.LogRecord) -> bool:
    """False for torchrun's log lines that repeat what the ranks say themselves: that it got
    a signal and passes it on, and that a rank exited with an error code (the rank printed
    why). Its lines on ranks killed by a signal, or that it had to kill, stay."""
    message = str(record.msg)
    if message.startswith(FAILED_NOTE):
        return record.args[0] < 0
    return not any(note in message for note in FORWARDING_NOTES)


def die_with_launcher() -> None:
    """Have Linux SIGKILL this process as soon as the process that started it (torchrun)
    exits, however it exits (prctl PR_SET_PDEATHSIG): a rank left on its own would go on
    training into the run folder. Under `launch`, a launcher already gone by now (killed
    while this process started) kills it at once. Nothing happens where there is no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is not None and os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGKILL)
