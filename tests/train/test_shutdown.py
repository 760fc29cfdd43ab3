"""Ending a run cleanly (SIGTERM/SIGINT: finish the step, checkpoint, one line, exit 75), the
run-folder lock, and step metrics that do not depend on how the batch is split.

The multi-process cases (signals through `tropd train --nproc`, a killed launcher, ranks
that agree on the step to stop at) are in `test_distributed.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_resumed_run_matches, config_file, read_metrics, tiny_config

from tropd import cli
from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch
from tropd.config import load_config
from tropd.objectives import get_objective
from tropd.train import loop, shutdown
from tropd.train.checkpoint import list_checkpoints


def write_config(pair, run_dir: Path, *overrides: str) -> Path:
    config = tiny_config(
        pair,
        run_dir,
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "teacher.top_k=8",
        "eval.num_prompts=8",
        "optim.lr=1e-2",
        *overrides,
    )
    return config_file(config, run_dir)


# --- SIGTERM / SIGINT -------------------------------------------------------------------


def test_sigterm_finishes_the_step_checkpoints_and_resume_continues_identically(
    tiny_pair, tmp_path, monkeypatch, capsys
):
    """SIGTERM arrives during step 3 (not a checkpoint step): the run ends after step 3 with
    its checkpoint, one line and exit 75; `--resume` then ends where an uninterrupted run
    ends, with the same metrics and weights."""
    common = ("run.steps=5", "run.save_every=4", "eval.every=2")
    full = tmp_path / "full"
    assert cli.main(["train", str(write_config(tiny_pair, full, *common))]) == cli.EXIT_OK
    stopped = tmp_path / "stopped"
    config = str(write_config(tiny_pair, stopped, *common))
    real_step = loop.train_step

    def signalled_in_step_3(setup, step, rank, world_size):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this thread
        return real_step(setup, step, rank, world_size)

    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(loop, "train_step", signalled_in_step_3)
    assert cli.main(["train", config]) == cli.EXIT_STOPPED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "SIGTERM" in err and "after step 3" in err and "--resume" in err
    assert [p.name for p in list_checkpoints(stopped)] == ["step_0000003"]
    assert [m["step"] for m in read_metrics(stopped)] == [0, 1, 2, 3]
    assert not (stopped / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # put back

    monkeypatch.setattr(loop, "train_step", real_step)
    assert cli.main(["train", config, "--resume"]) == cli.EXIT_OK
    assert [m["step"] for m in read_metrics(stopped)] == [0, 1, 2, 3, 4, 5]
    assert_resumed_run_matches(full, stopped)


def test_stop_signals_record_the_first_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with shutdown.stop_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm and torchrun may both send one
        assert request.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with shutdown.stop_signals() as request:
        assert request.signal is None
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signal == "SIGINT"


# --- the run-folder lock ----------------------------------------------------------------


def test_a_second_job_on_a_locked_run_folder_is_refused_with_the_holders_pid(
    tiny_pair, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = str(write_config(tiny_pair, run_dir, "run.steps=1", "eval.every=0"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from tropd.train.shutdown import lock_run_dir; "
            f"lock = lock_run_dir(Path({str(run_dir)!r})); print('locked', flush=True); "
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        for resume in ([], ["--resume"]):
            assert cli.main(["train", config, *resume]) == cli.EXIT_USAGE
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert f"in use by another tropd job (pid {holder.pid} on " in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["train", config]) == cli.EXIT_OK  # the kernel dropped the lock


# --- metrics: those of one process holding the whole batch ------------------------------


def test_combine_metrics_weighs_means_and_sums_counts():
    parts = [
        ({"entropy": 1.0, "tokens": 2.0, "rare": 0.0}, {"entropy": 2.0, "rare": 0.0}),
        ({"entropy": 4.0, "tokens": 3.0, "rare": 0.5}, {"entropy": 6.0, "rare": 2.0}),
    ]
    assert loop.combine_metrics(parts) == {"entropy": 3.25, "tokens": 5.0, "rare": 0.5}
    assert loop.combine_metrics([({"rare": 0.0}, {"rare": 0.0})]) == {"rare": 0.0}


def fixed_batch(rows: int = 7, width: int = 9, vocab: int = 12, k: int = 4) -> TokenBatch:
    """A batch whose rows differ in length, prefix and student tokens, with left padding."""
    gen = torch.Generator().manual_seed(0)
    origin = torch.full((rows, width), PROMPT)
    for row in range(rows):
        start, prefix = 2 + row % 3, row % 4
        origin[row, start : start + prefix] = TEACHER
        origin[row, start + prefix : width - row % 2] = STUDENT
    attention = (origin != PROMPT) | (torch.arange(width) >= 1)
    topk = torch.rand(rows, width, vocab, generator=gen).log_softmax(-1).topk(k)
    return TokenBatch(
        tokens=torch.randint(vocab, (rows, width), generator=gen),
        origin=origin,
        attention_mask=attention.long(),
        sampler_logprobs=-torch.rand(rows, width, generator=gen) * 3,
        teacher_logprobs=-torch.rand(rows, width, generator=gen) * 3,
        teacher_topk_ids=topk.indices,
        teacher_topk_logprobs=topk.values,
        reward=torch.rand(rows, generator=gen),
        group=torch.arange(rows) // 2,
    )


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tropd", {"trust_gate": "soft", "beta": 0.5}),  # outlier-token means, prefix tokens
        ("grpo", {}),  # a per-sequence metric (task_reward)
    ],
)
def test_micro_batch_metrics_combine_to_the_whole_batchs(name, options):
    """Per-token means weighted by tokens, per-sequence means by rows, counts summed: the
    micro-batches of a fixed batch (uneven token counts) give the whole batch's metrics."""
    batch = fixed_batch()
    logits = torch.randn(*batch.tokens.shape, 12, generator=torch.Generator().manual_seed(1))
    objective = get_objective(name, **options)
    whole = objective(logits, batch)
    parts = []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 7)):
        out = objective(logits[rows], batch.select(rows))
        parts.append((out.metrics, out.weights))
    combined = loop.combine_metrics(parts)
    assert combined.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert combined[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    # A row-weighted mean of the parts (the old rule) differs: the test can fail.
    rows = [3, 1, 3]
    old = sum(n * m["student_entropy"] for n, (m, _) in zip(rows, parts, strict=True)) / 7
    assert old != pytest.approx(whole.metrics["student_entropy"], rel=1e-3)


def test_step_metrics_do_not_depend_on_the_micro_batch_size(tiny_pair, tmp_path):
    """One training step, the same rollouts, in one micro-batch or in micro-batches of 3
    rows: the same metrics up to float32 rounding."""
    records = []
    for size in (8, 3):
        config = load_config(
            write_config(
                tiny_pair,
                tmp_path / f"mb{size}",
                f"optim.micro_batch_size={size}",
                "objective.options={trust_gate: soft}",
            )
        )
        setup = loop.build(config, tmp_path / f"mb{size}")
        loop.seed_everything(config.run.seed, 1, 0)
        records.append(loop.train_step(setup, 1, 0, 1))
    whole, split = records
    keys = [k for k in whole if not k.startswith("time_") and k != "samples"]
    assert {"student_entropy", "reward_mean", "student_tokens", "trust_fraction"} <= set(keys)
    for key in keys:
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{output_dir: {tmp_path / 'file' / 'run'}, steps: 1}}\n")
    assert cli.main(["train", str(config)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create it" in err and "run.output_dir" in err, err
