"""Progress in a log file: plain lines while the run goes, none cut at the log's width."""

from io import StringIO

from rich.console import Console

from tropd.console import PLAIN_LINES, StepProgress


def test_a_log_gets_plain_lines_as_the_run_goes():
    log = StringIO()
    console = Console(file=log, width=40)  # a file: not a terminal
    with StepProgress("train", 100, console=console) as progress:
        for step in range(1, 101):
            progress.update(step, f"loss {1 / step:.4f}  and a long tail of metrics to show")
            if step == 30:
                assert log.getvalue().count("\n") == 3, "lines appear while the run goes"
    lines = log.getvalue().splitlines()
    assert len(lines) == PLAIN_LINES
    assert lines[-1].startswith("train 100/100 (") and lines[-1].endswith("metrics to show")


def test_disabled_progress_prints_nothing():
    log = StringIO()
    with StepProgress("train", 10, enabled=False, console=Console(file=log)) as progress:
        for step in range(1, 11):
            progress.update(step, "x")
    assert log.getvalue() == ""
