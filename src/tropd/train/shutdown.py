"""Ending a run cleanly, and one job per run folder.

SIGTERM (what Slurm and Kubernetes send before they kill a job) and SIGINT (Ctrl-C) do not
kill a training run: the step in progress finishes, its checkpoint is written and `train`
raises `RunStopped` (`tropd train` prints its one line and exits 75). With several
processes the ranks agree after every step whether any of them got a signal
(`distributed.any_rank`), so all stop after the same step. A second Ctrl-C stops at once,
without a checkpoint (KeyboardInterrupt); repeated SIGTERMs are ignored.

A run folder is locked (`flock` on `RUN/.lock`, which names the holder's pid and host) for
as long as a job writes into it, so a second job (a `--resume` while the first still runs,
a launcher started twice) is refused with one line instead of interleaving two runs'
checkpoints and logs. The kernel drops the lock when the holder exits, however it exits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tropd.config import ConfigError
from tropd.train import distributed

LOCK_FILE = ".lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopRequest:
    """What `stop_signals` saw: the name of the first signal (e.g. `SIGTERM`), or None."""

    signal: str | None = None


class RunStopped(KeyboardInterrupt):
    """The run stopped early on a signal, after writing the checkpoint of `step`. A
    KeyboardInterrupt, so that code catching `Exception` lets it through, as it would Ctrl-C."""

    def __init__(self, cause: str, step: int, checkpoint: Path):
        super().__init__(
            f"{cause}: stopped after step {step} with checkpoint {checkpoint}; "
            "continue with --resume"
        )
        self.step, self.checkpoint = step, checkpoint


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Inside, SIGTERM and SIGINT are recorded in the yielded `StopRequest` (the loop stops
    after the step) instead of ending the process; a second SIGINT raises
    KeyboardInterrupt. The previous handlers come back on exit. Off the main thread, where
    Python cannot set handlers, nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame) -> None:
        if request.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal = request.signal or signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Inside, this job holds `run_dir` (created if missing): rank 0 takes the lock for all
    processes, and every process raises the same one-line ConfigError when another job holds
    it."""
    handle, error = None, None
    if distributed.is_main_process():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = lock_run_dir(run_dir)
        except ConfigError as err:
            error = str(err)
        except OSError as err:  # e.g. a file in the way, a name too long, no permission
            error = (
                f"run.output_dir {str(run_dir)!r}: cannot create it ({err.strerror}); "
                "choose another run.output_dir"
            )
    error = distributed.broadcast_from_main(error)  # the other ranks must not wait for it
    if error is not None:
        raise ConfigError(error)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Take the exclusive lock on `run_dir` (an existing folder) and write this process's pid
    and host into the lock file; the lock lasts until the returned file is closed or the
    process ends. Raises ConfigError (one line, naming the holder) when another holds it."""
    path = run_dir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(
                f"run.output_dir {str(run_dir)!r} is in use by another tropd job ({holder}); "
                "wait for it to end or stop it, or choose another run.output_dir"
            ) from None
        raise ConfigError(
            f"run.output_dir {str(run_dir)!r}: cannot lock {path} ({err.strerror}); use a "
            "filesystem with flock support (NFSv4, Lustre mounted with -o flock)"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
