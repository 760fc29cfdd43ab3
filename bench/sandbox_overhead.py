"""Per-program cost of the bubblewrap sandbox: `run_program` in bwrap vs the same harness
as a plain subprocess (the `TROPD_ALLOW_UNSANDBOXED_CODE=1` runner), side by side.

Runs a HumanEval-sized program (a function and five asserts) `--runs` times each way,
interleaved so that machine load hits both alike, and prints the median wall time per
program of each and their ratio. `python bench/sandbox_overhead.py --runs 40`
"""

from __future__ import annotations

import argparse
import statistics

from tropd.tasks.sandbox import Limits, _run, bwrap_problem

PROGRAM = """
def add(a, b):
    return a + b
for a, b in [(1, 2), (0, 0), (-1, 1), (10**9, 1), (2.5, 0.5)]:
    assert add(a, b) == a + b
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    if bwrap_problem() is not None:
        raise SystemExit(f"no sandbox to measure: {bwrap_problem()}")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.runs):
        for sandboxed in (True, False):
            result = _run(PROGRAM, Limits(), sandboxed=sandboxed)
            assert result.passed, result.output
            seconds[sandboxed].append(result.seconds)
    bwrap, plain = (statistics.median(seconds[s]) * 1000 for s in (True, False))
    print(
        f"median per program over {args.runs} runs: bwrap {bwrap:.1f} ms, plain subprocess "
        f"{plain:.1f} ms, overhead {bwrap - plain:.1f} ms ({bwrap / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
