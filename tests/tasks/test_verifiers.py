"""Verifiers: math equivalence, and generated code classified correctly within its limits."""

from __future__ import annotations

import os
import time

import pytest
from conftest import needs_bwrap

from tropd.tasks import Item
from tropd.tasks.verifiers import (
    Limits,
    code_score,
    exact_score,
    extract_code,
    math_equal,
    run_program,
    tagged_answer,
)

LIMITS = Limits(timeout_s=2.0, memory_mb=512)


def test_exact_and_tagged_answers():
    item = Item("q", "42")
    assert exact_score(" 42\n", item) == 1.0
    assert exact_score("thinking... <answer>42</answer>", item) == 1.0
    assert exact_score("<answer>41</answer> 42", item) == 0.0
    assert tagged_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"


@pytest.mark.parametrize(
    ("response", "answer", "equal"),
    [
        ("0.5", "1/2", True),
        ("$\\frac{1}{2}$", "0.5", True),
        ("So the result is \\boxed{\\frac12}.", "1/2", True),
        ("<answer>2/4</answer>", "0.5", True),
        ("The answer is 42.", "42", True),
        ("$x = 3$", "3", True),
        ("$\\sqrt{4}$", "2", True),
        ("0.51", "1/2", False),
        ("\\boxed{3}", "4", False),
        ("no number here", "4", False),
    ],
)
def test_math_equivalences(response, answer, equal):
    pytest.importorskip("math_verify")
    assert math_equal(response, answer) is equal


def test_extract_code_takes_the_fenced_block():
    response = "Here:\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(response) == "def f():\n    return 1\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
ITEM = Item("write add", "", tests=TESTS, meta={"entry_point": "add"})


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("def add(a, b):\n    return a + b", "passed"),
        ("def add(a, b):\n    return a - b", "failed"),
        ("def add(a, b):\n    raise ValueError('no')", "error"),
        ("def add(a, b:\n", "error"),
        ("def add(a, b):\n    while True:\n        pass", "timeout"),
        ("import time\ndef add(a, b):\n    time.sleep(60)", "timeout"),
        (
            "def add(a, b):\n    x = []\n    while True:\n        x.append(bytearray(10**7))",
            "memory",
        ),
        ("import sys\nsys.exit(0)\ndef add(a, b):\n    return 0", "exited"),
        ("import os\nos._exit(0)\ndef add(a, b):\n    return 0", "exited"),
    ],
)
@needs_bwrap
def test_programs_are_classified_within_the_time_limit(program, status):
    started = time.perf_counter()
    result = run_program(f"{program}\n{TESTS}", LIMITS)
    assert result.status == status, result.output
    assert time.perf_counter() - started < LIMITS.timeout_s + 3
    expected = 1.0 if status == "passed" else 0.0
    assert code_score(f"```python\n{program}\n```", ITEM, LIMITS) == expected


@needs_bwrap
def test_a_program_can_use_its_scratch_directory_and_sees_no_secrets(monkeypatch):
    monkeypatch.setenv("TROPD_TEST_SECRET", "hunter2")
    program = (
        "import os\n"
        "open('notes.txt', 'w').write('hi')\n"
        "assert open('notes.txt').read() == 'hi'\n"
        "assert 'TROPD_TEST_SECRET' not in os.environ\n"
        "assert os.environ['HOME'] == os.getcwd() == '/tmp'\n"
    )
    result = run_program(program, LIMITS)
    assert result.status == "passed", result.output
    assert os.environ["TROPD_TEST_SECRET"] == "hunter2"


@needs_bwrap
def test_huge_output_is_bounded():
    result = run_program("while True:\n    print('x' * 10000)", Limits(timeout_s=5, file_size_mb=1))
    assert result.status in ("error", "timeout") and len(result.output) <= 4000


@needs_bwrap
def test_completion_of_the_prompt_code_is_supported():
    item = Item(
        "complete",
        "",
        tests="assert double(4) == 8",
        meta={"entry_point": "double", "code_prompt": "def double(x):\n"},
    )
    assert code_score("    return 2 * x\n", item, LIMITS) == 1.0
