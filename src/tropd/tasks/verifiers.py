"""Verifiers: is a response right? Exact match, math answers, and code run against tests.

`get_verifier(name)` returns a function `(response, item) -> float` in [0, 1].

Code is run by `run_program` in a separate Python process: a fresh scratch
directory as its working directory and `$HOME`, a scrubbed environment, resource
limits (CPU seconds, address space, file size, open files, no core dumps) set in the
child before the program starts, a wall-clock timeout after which its whole process
group is killed, and an audit hook (PEP 578) that refuses writes outside the scratch
directory, starting processes, sending signals, sockets and `ctypes`. These limits
keep a wrong or runaway program from hanging, exhausting memory or writing over
files and taking a training run down. They are not a security boundary against code
written to escape: run untrusted models in a container or VM (see README).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tropd.tasks.task import Item

Verifier = Callable[[str, Item], float]

ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def tagged_answer(response: str) -> str | None:
    """The text of the last `<answer>...</answer>` in `response`, stripped; None if none."""
    found = ANSWER_TAG.findall(response)
    return found[-1].strip() if found else None


def exact_score(response: str, item: Item) -> float:
    """1.0 when the (tagged, else whole) response equals the answer, spaces stripped."""
    answer = tagged_answer(response)
    text = answer if answer is not None else response
    return 1.0 if text.strip() == item.answer.strip() else 0.0


# --- math ------------------------------------------------------------------------


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ValueError(
            "the math verifier needs math-verify; install it with pip install 'tropd[tasks]'"
        ) from None
    return math_verify


def math_equal(response: str, answer: str) -> bool:
    """Whether the final answer in `response` equals `answer` mathematically.

    The answer is the `<answer>` tag when there is one, else what math-verify
    extracts (`\\boxed{}` first, then the last expression): `1/2`, `0.5` and
    `\\frac{1}{2}` are all equal. math-verify's own timeouts use `signal.alarm`, which
    works only in the main thread; elsewhere they are off.
    """
    mv = _math_verify()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    tagged = tagged_answer(response)
    target = mv.parse(tagged if tagged is not None else response, parsing_timeout=timeout)
    gold = mv.parse(answer, parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(mv.verify(gold, target, timeout_seconds=timeout))


def math_score(response: str, item: Item) -> float:
    return 1.0 if math_equal(response, item.answer) else 0.0


# --- code ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a program may use: wall and CPU seconds, address space and file size (MiB)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64


@dataclass(frozen=True)
class ProgramResult:
    """How a program ended. `status`: passed (exit 0), failed (an `AssertionError`),
    error (another exception or a syntax error), timeout, memory, or blocked (the
    sandbox refused something). `output` is the end of stdout+stderr."""

    status: str
    returncode: int | None
    output: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the child before the program: limits, then the audit hook, then the program.
# argv: scratch dir, program file, cpu seconds, memory bytes, file-size bytes, open files.
_GUARD = r"""
import os, resource, sys
scratch = os.path.realpath(sys.argv[1])
program = sys.argv[2]
cpu, memory, fsize, nofile = (int(v) for v in sys.argv[3:7])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
source = open(program).read()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
           "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree",
           "shutil.copyfile", "shutil.move", "os.chflags", "os.lchflags"}
REFUSED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.connect", "socket.bind",
           "socket.sendto", "os.setuid", "resource.setrlimit", "sys.addaudithook"}
REFUSED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess"}
def inside(path):
    if isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == scratch or real.startswith(scratch + os.sep)
def refuse(what):
    raise PermissionError(f"sandbox: {what} is not allowed")
def hook(event, args):
    if event == "open":
        if args[2] & WRITE_FLAGS or (args[1] and any(c in args[1] for c in "wax+")):
            if not inside(args[0]):
                refuse(f"writing {args[0]!r} outside the scratch directory")
    elif event in CHANGES:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                refuse(f"{event} on {arg!r} outside the scratch directory")
    elif event in REFUSED or (event == "import" and args[0] in REFUSED_IMPORTS):
        refuse(event if event != "import" else f"import {args[0]}")
sys.addaudithook(hook)
del hook
sys.argv = [program]
exec(compile(source, program, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _scrubbed_env(scratch: Path) -> dict[str, str]:
    """Nothing from the parent's environment (no tokens, no proxies, no CUDA settings)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",  # thread pools reserve address space against RLIMIT_AS
        "OPENBLAS_NUM_THREADS": "1",
    }


def _classify(returncode: int, output: str, done_marker: str | None) -> str:
    if returncode == 0 and (done_marker is None or done_marker in output):
        return "passed"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if "MemoryError" in output:
        return "memory"
    if "PermissionError: sandbox:" in output:
        return "blocked"
    if "AssertionError" in output or returncode == 0:
        return "failed"  # exit 0 without the marker: it left before the tests ran
    return "error"


def run_program(
    program: str,
    limits: Limits | None = None,
    done_marker: str | None = None,
    python: str | None = None,
) -> ProgramResult:
    """Run Python source `program` in a fresh sandboxed process and say how it ended.

    With `done_marker`, "passed" also needs that text in the output: the caller ends
    the program by printing it, so a program that exits early (`sys.exit(0)` before
    the tests) does not pass.
    The program runs as `__main__` with its scratch directory as working directory;
    stdout and stderr go to files there (bounded by the file-size limit) and the
    directory is deleted afterwards. `python` defaults to this interpreter, started
    isolated (`-I`: no user site, no `PYTHON*` variables).
    """
    limits = limits or Limits()
    scratch = Path(tempfile.mkdtemp(prefix="tropd-code-"))
    try:
        program_file = scratch / "program.py"
        program_file.write_text(program)
        log = scratch / "output.txt"
        argv = [
            python or sys.executable,
            "-I",
            "-B",
            "-c",
            _GUARD,
            str(scratch),
            str(program_file),
            str(max(1, int(limits.timeout_s + 0.999))),
            str(limits.memory_mb * 2**20),
            str(limits.file_size_mb * 2**20),
            str(limits.open_files),
        ]
        started = time.perf_counter()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=scratch,
                env=_scrubbed_env(scratch),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.perf_counter() - started
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 4000))
            output = handle.read().decode("utf-8", "replace")
        status = "timeout" if returncode is None else _classify(returncode, output, done_marker)
        return ProgramResult(status, returncode, output, seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def extract_code(response: str) -> str:
    """The program in a response: the longest fenced code block, else the whole text."""
    blocks = CODE_BLOCK.findall(response)
    return max(blocks, key=len) if blocks else response


def code_score(response: str, item: Item, limits: Limits | None = None) -> float:
    """1.0 when the program in `response`, followed by `item.tests`, exits cleanly.

    A response that does not define the item's `entry_point` (in `item.meta`) is
    taken as a completion of the prompt's code, as in HumanEval.
    """
    if item.tests is None:
        raise ValueError("the code verifier needs test code; map a tests field for this task")
    code = extract_code(response)
    entry = item.meta.get("entry_point")
    if entry and not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        code = item.meta.get("code_prompt", item.prompt) + code
    elif "code_prompt" in item.meta:
        # Keep the prompt's imports (HumanEval prompts start with them).
        imports = [
            line
            for line in item.meta["code_prompt"].splitlines()
            if line.startswith(("import ", "from "))
        ]
        code = "\n".join([*imports, code])
    marker = f"tropd-tests-done-{secrets.token_hex(8)}"
    program = f"{code}\n\n{item.tests}\n\nprint({marker!r})\n"
    return 1.0 if run_program(program, limits, done_marker=marker).passed else 0.0


VERIFIERS: dict[str, Verifier] = {
    "exact": exact_score,
    "math": math_score,
    "code": code_score,
}


def get_verifier(name: str) -> Verifier:
    """The verifier called `name` (exact, math or code)."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; use one of {', '.join(VERIFIERS)}")
    return VERIFIERS[name]
