"""Test helper: run many `tropd train` command lines, each in a forked child of one process
that has imported tropd but run no torch code (so a fork is cheap and safe).

`python fuzz_harness.py CASES.json RESULTS.json TIMEOUT_S`: CASES is a list of
`{"dir": ..., "argv": [...]}`; each case runs `tropd.cli.main(argv)` in its folder with
stderr going to a file. RESULTS gets, per case, the exit code (None when it ran past
TIMEOUT_S and was killed), stderr, and what escaped `cli.main` (a traceback), if anything.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

import tropd.train.loop  # noqa: F401  (imported before forking, so children start warm)
from tropd import cli

MEMORY_LIMIT = 6 * 2**30  # a case that tries to allocate more fails instead of the machine


def run_case(case: dict) -> None:
    """In the child: run one command line and exit with its code."""
    os.chdir(case["dir"])
    err = os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    code = 99
    try:
        code = cli.main(case["argv"])
    except BaseException:  # what a user would see as a traceback
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 98)


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    timeout_s = float(sys.argv[3])
    results = []
    for case in cases:
        pid = os.fork()
        if pid == 0:
            run_case(case)
        deadline, code = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        stderr = (Path(case["dir"]) / "stderr.txt").read_text(errors="replace")
        results.append({"code": code, "stderr": stderr})
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
