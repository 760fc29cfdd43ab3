"""The code sandbox: run a generated Python program in an OS-level sandbox and say how it ended.

`run_program(source, limits)` runs `source` as `__main__` in a fresh Python process inside
bubblewrap (`bwrap`, the sandbox Flatpak uses; Debian/Ubuntu package `bubblewrap`):

- its own namespaces: no network (an empty network namespace), its own PID namespace (it
  cannot see or signal the trainer; its `/proc` shows only its own processes), IPC, UTS,
  cgroup and (as a non-root user) user namespace; all capabilities dropped (as root the
  harness keeps setuid/setgid until it switches to the program's uid), a new session (no
  terminal injection) and `--die-with-parent`;
- a filesystem of read-only binds of `/usr`, `/lib*`, `/bin`, `/sbin`, two files of `/etc`
  and the interpreter's own prefixes (venv and base installation), nothing else of the
  host (no home directory, no repository, no host `/tmp`); `/` and `/dev` read-only;
- a size-capped tmpfs (`scratch_mb`) at `/tmp` as working directory and `$HOME`: it lives
  in the sandbox's mount namespace and vanishes with it, whatever the program did to it;
- an environment of a few fixed variables (nothing from the trainer's: bwrap itself, the
  sandbox's PID 1, is started with that environment too);
- rlimits set before the program starts: CPU seconds, address space, file size, open
  files, processes (threads included; it counts the sandbox's own processes only: its
  user namespace, or as root a fresh random uid the program runs as) and no core dumps;
  a wall-clock timeout after which the sandbox is killed as a whole.

The verdict: the parent sends a random marker through the program's stdin, which the
harness reads to the end and replaces with /dev/null before the program starts; when the
program (its code and the tests after it) has run to its end, the harness writes the
marker to a pipe of its own, else a status word. Only the marker counts as a pass, so a
program cannot pass by exiting early (`os._exit(0)`, `sys.exit(0)`, `raise SystemExit`) or
by looking for the marker in argv, the environment, files or its parent.

What it does not protect against: the harness and the program share one interpreter, so
a program written to introspect it (the harness's frame through `sys._getframe`,
`gc.get_objects()`, `/proc/self/mem`) can find the marker and forge a pass, and it can
game weak tests (an object whose `__eq__` is always true). There is no seccomp filter:
the program can make any system call, so a kernel bug is an escape. Memory is capped per
process (address space) and processes are capped in number, not in sum.

Without a working bwrap, generated code is refused unless `TROPD_ALLOW_UNSANDBOXED_CODE=1`
is set; then it runs as a plain subprocess with the same harness and rlimits (no process
limit, no scratch cap) in a host scratch directory deleted afterwards (folders made
unreadable included; as root, a file made immutable stays, with a warning), which protects
the trainer from runaway programs only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

ALLOW_UNSANDBOXED = "TROPD_ALLOW_UNSANDBOXED_CODE"
SCRATCH = "/tmp"  # inside the sandbox: the tmpfs, also $HOME and $TMPDIR
# What the harness reports when the program did not run to its end (the pass is the marker).
REPORTED = ("failed", "error", "exited", "memory")
OUTPUT_TAIL = 4000  # characters of output kept
MARKER_BYTES = 16


@dataclass(frozen=True)
class Limits:
    """What a program may use: wall and CPU seconds, address space, the size of one file
    and of the whole scratch directory (MiB), open files and processes (threads count)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    scratch_mb: int = 64
    open_files: int = 64
    processes: int = 16


@dataclass(frozen=True)
class ProgramResult:
    """How a program ended. `status`: passed (it ran to its end), failed (an
    `AssertionError`), error (another exception, a syntax error, a fatal signal), exited (it
    left before its end: `sys.exit`, `os._exit`), timeout (wall clock or CPU limit) or
    memory (`MemoryError`). `output` is the end of stdout+stderr."""

    status: str
    returncode: int | None
    output: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the sandboxed interpreter: read the marker and program from stdin, set the
# limits, drop to `uid` (as root), run the program as `__main__`, report on `result_fd`.
# argv: result fd, uid (0: keep), cpu s, address space, file size, open files, processes
# (0: no limit). The marker stays a local of `main` (see the module docstring).
_HARNESS = r"""
import linecache, os, resource, sys, traceback, types
def main():
    result_fd, uid, cpu, memory, fsize, nofile, nproc = (int(v) for v in sys.argv[1:8])
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    payload = b"".join(chunks)
    marker, source = payload[:MARKER_HEX], payload[MARKER_HEX:].decode()
    del chunks, payload
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NOFILE, nofile, nofile),
              (resource.RLIMIT_CORE, 0, 0)]
    if nproc:
        limits.append((resource.RLIMIT_NPROC, nproc, nproc))
    for what, soft, hard in limits:
        resource.setrlimit(what, (soft, hard))
    if uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    write, leave = os.write, os._exit
    linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    sys.argv = ["program.py"]
    kinds = ((AssertionError, b"failed"), (MemoryError, b"memory"), (SystemExit, b"exited"))
    try:
        exec(compile(source, "program.py", "exec"), module.__dict__)
        verdict = marker
    except BaseException as err:
        module.__dict__.clear()  # after a MemoryError, free what the program holds
        verdict = next((word for kind, word in kinds if isinstance(err, kind)), b"error")
        try:
            traceback.print_exception(type(err), err, err.__traceback__.tb_next)
        except BaseException:
            pass
    try:
        write(result_fd, b"\n" + verdict + b"\n")
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    leave(0)
main()
""".replace("MARKER_HEX", str(2 * MARKER_BYTES))


def _environment(home: str) -> dict[str, str]:
    """The program's whole environment: nothing from the trainer's (no tokens or keys)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",  # thread pools reserve address space against RLIMIT_AS
        "OPENBLAS_NUM_THREADS": "1",
    }


def _bwrap_argv(bwrap: str, limits: Limits, uid: int) -> list[str]:
    """bwrap's options: namespaces, read-only system binds, the scratch tmpfs."""
    argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid"]
    argv += ["--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL"]
    if uid:  # root: no user namespace, so the harness can become `uid` (then no caps)
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"]
    # The scratch first: binds below it (a venv under /tmp) then show through it.
    argv += ["--perms", "0777", "--size", str(limits.scratch_mb * 2**20), "--tmpfs", SCRATCH]
    bound: list[str] = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
            bound.append(top)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for prefix in sorted(os.path.realpath(p) for p in prefixes):
        if not any(prefix == b or prefix.startswith(b + os.sep) for b in bound):
            # Folders on the way (e.g. /root, 0700 on the host) readable by the program's uid.
            parts = prefix.split(os.sep)[1:-1]
            for depth in range(1, len(parts) + 1):
                argv += ["--perms", "0755", "--dir", os.sep + os.path.join(*parts[:depth])]
            argv += ["--ro-bind", prefix, prefix]
            bound.append(prefix)
    for name in ("/etc/ld.so.cache", "/etc/localtime"):
        argv += ["--ro-bind-try", name, name]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    return [*argv, "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", SCRATCH]


def _harness_argv(result_fd: int, limits: Limits, uid: int, nproc: int) -> list[str]:
    cpu = max(1, int(limits.timeout_s + 0.999))
    return [
        sys.executable,
        "-I",  # isolated: no user site, no PYTHON* variables, no script directory on the path
        "-B",
        "-c",
        _HARNESS,
        str(result_fd),
        str(uid),
        str(cpu),
        str(limits.memory_mb * 2**20),
        str(limits.file_size_mb * 2**20),
        str(limits.open_files),
        str(nproc),
    ]


def _collect(proc: subprocess.Popen, result_fd: int, timeout_s: float) -> tuple[bytes, bytes, bool]:
    """Read the output and the verdict until both pipes close or the time is up; then kill.

    Returns the output's tail, the verdict pipe's tail and whether the time ran out.
    Killing bwrap kills the sandbox's PID 1 (`--die-with-parent`), and with it every
    process in the sandbox, so the pipes close soon after; a 2 s grace bounds the wait.
    """
    keep = 4 * OUTPUT_TAIL
    output, verdict = bytearray(), bytearray()
    deadline, timed_out = time.monotonic() + timeout_s, False
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, output)
        selector.register(result_fd, selectors.EVENT_READ, verdict)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                if timed_out:
                    break
                timed_out = True
                _kill(proc)
                deadline = time.monotonic() + 2.0
                continue
            for key, _ in selector.select(left):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(data)
                del key.data[:-keep]
    _kill(proc)
    proc.wait()
    return bytes(output), bytes(verdict), timed_out


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: bwrap, or the plain runner


def _status(
    verdict: bytes, marker: bytes, returncode: int, timed_out: bool, sandboxed: bool
) -> str:
    if marker in verdict:
        return "passed"
    # Status words are for reporting only: the program could write them, so never "passed".
    words = verdict.split()
    if words and words[-1].decode("ascii", "replace") in REPORTED:
        return words[-1].decode()
    # No verdict: the process died. bwrap reports a signal as 128 + its number.
    signum = -returncode if returncode < 0 else returncode - 128 if sandboxed else 0
    if timed_out or signum == signal.SIGXCPU:  # the CPU limit's soft signal
        return "timeout"
    return "exited" if returncode == 0 else "error"


def _run(program: str, limits: Limits, sandboxed: bool) -> ProgramResult:
    marker = secrets.token_hex(MARKER_BYTES).encode()
    result_r, result_w = os.pipe()
    scratch = None
    if sandboxed:
        # As root, the program runs as a fresh uid so that RLIMIT_NPROC (which root
        # ignores) counts only its own processes.
        uid = secrets.randbelow(2**30) + 2**30 if os.geteuid() == 0 else 0
        bwrap = shutil.which("bwrap") or "bwrap"
        argv = _bwrap_argv(bwrap, limits, uid) + _harness_argv(
            result_w, limits, uid, limits.processes
        )
        cwd, env = "/", _environment(SCRATCH)
    else:
        # RLIMIT_NPROC would count all of this user's processes: left out.
        scratch = tempfile.mkdtemp(prefix="tropd-code-")
        argv = _harness_argv(result_w, limits, 0, 0)
        cwd, env = scratch, _environment(scratch)
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(result_w,),
            start_new_session=True,
        )
        os.close(result_w)
        result_w = -1
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(marker + program.encode("utf-8", "replace"))
        with proc.stdout:
            output, verdict, timed_out = _collect(proc, result_r, limits.timeout_s)
    finally:
        for fd in (result_r, result_w):
            if fd >= 0:
                os.close(fd)
        if scratch is not None:
            _remove(scratch)
    text = output.decode("utf-8", "replace")[-OUTPUT_TAIL:]
    status = _status(verdict, marker, proc.returncode, timed_out, sandboxed)
    return ProgramResult(status, proc.returncode, text, time.perf_counter() - started)


def _remove(scratch: str) -> None:
    """Delete a host scratch directory, folders the program made unreadable included."""
    for folder, dirs, _ in os.walk(scratch):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
    shutil.rmtree(scratch, ignore_errors=True)
    if os.path.exists(scratch):
        warnings.warn(f"could not remove the code scratch directory {scratch}", stacklevel=3)


@functools.cache
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot run programs here, or None when it can (probed once)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = _run("pass", Limits(timeout_s=30), sandboxed=True)
    if not probe.passed:
        lines = probe.output.strip().splitlines() or [f"status {probe.status}"]
        return f"bwrap does not work here ({lines[-1]})"
    return None


def check_sandbox() -> bool:
    """True when generated code will run in bubblewrap, False when the user opted out of
    the sandbox (`TROPD_ALLOW_UNSANDBOXED_CODE=1`); a one-line `ValueError` otherwise."""
    problem = bwrap_problem()
    if problem is None:
        return True
    if os.environ.get(ALLOW_UNSANDBOXED) == "1":
        return False
    raise ValueError(
        f"running generated code needs a sandbox, but {problem}: install bubblewrap "
        f"(apt-get install bubblewrap, dnf install bubblewrap) or set "
        f"{ALLOW_UNSANDBOXED}=1 to run it unsandboxed at your own risk"
    )


def run_program(program: str, limits: Limits | None = None) -> ProgramResult:
    """Run Python source `program` as `__main__` in the sandbox and say how it ended.

    "passed" means the program ran to its end: put the tests at its end. stdout and
    stderr are read through a pipe and only their last 4000 characters kept. Raises a
    one-line `ValueError` when there is no sandbox and no opt-out (`check_sandbox`).
    """
    return _run(program, limits or Limits(), sandboxed=check_sandbox())
