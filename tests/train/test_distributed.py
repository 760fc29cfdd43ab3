"""Multi-process training on CPU (2 gloo ranks): equivalence with one process, sharded
checkpoints that resume exactly (and that `tropd eval` reads), stopping on a signal, ranks
that die with their launcher, the rank timeout, and the settings checked up front.

Equivalence needs the same global batch whatever the world size, so these runs go through
`dist_harness.py`, which samples each prompt's rollouts on their own (seeded by step and
prompt). With that, one process and two ranks see the same tokens, and losses, gradient
norms, weights and every metric agree up to float summation order. Tolerances: metrics
1e-4 relative (measured: loss 4e-6, grad_norm 6e-7), weights 5e-5 absolute (measured 4e-6,
while training moves them by 0.04). A wrong gradient scale or token denominator changes the
loss or gradient norm by a factor of 2; per-rank means or counts change the token metrics
by far more than 1e-4 (student_entropy 0.981 against 0.899 once).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import config_file, read_metrics, tiny_config
from dist_harness import per_prompt_rollout
from transformers import AutoModelForCausalLM

from tropd.cli import EXIT_STOPPED
from tropd.cli import main as cli_main
from tropd.config import ConfigError, load_config
from tropd.model_names import load_eval_model
from tropd.train import distributed, loop
from tropd.train.checkpoint import list_checkpoints
from tropd.train.shutdown import lock_run_dir

HARNESS = Path(__file__).with_name("dist_harness.py")
SETTINGS = (
    "model.device=cpu",  # gloo: what these tests check, also on a machine with GPUs
    "run.steps=4",
    "run.save_every=2",
    "run.progress=false",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=6",
    "teacher.top_k=8",
    "eval.every=2",
    "eval.num_prompts=8",
    "optim.lr=1e-2",
    "optim.micro_batch_size=4",
    "objective.options={trust_gate: soft}",
    # The harness samples prompt by prompt so rollouts do not depend on how prompts are
    # split; a teacher loop over several steps' rows of one rank would.
    "guidance.write_ahead=1",
)
# Every metric but the step and the timings: none depends on how rows are split into ranks and
# micro-batches (token means are token-weighted, counts summed).
GLOBAL_KEYS = (
    "loss",
    "grad_norm",
    "skipped",
    "skipped_steps",
    "lr",
    "prefix_cap",
    "prefix_len_mean",
    "response_len",
    "off_policy_fraction",
    "reward_mean",
    "student_entropy",
    "trust_fraction",
    "outlier_fraction",
    "trust_probability",
    "fkl_outlier",
    "floor_fraction",
    "teacher_topk_mass",
    "student_tokens",
    "teacher_tokens",
    "eval/accuracy",
    "eval/reverse_kl",
    "eval/response_len",
)


def write_config(pair, run_dir: Path, *overrides: str) -> Path:
    return config_file(tiny_config(pair, run_dir, *SETTINGS, *overrides), run_dir)


def run_ranks(tmp: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone` on this machine, with its scratch files kept under `tmp`."""
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def harness(tmp: Path, config: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_ranks(tmp, str(HARNESS), str(config), *flags)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def assert_same_run(expected: Path, got: Path, keys, rel: float, atol: float) -> None:
    a, b = read_metrics(expected), read_metrics(got)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in keys:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-7), (x["step"], key)
    weights_a, weights_b = final_weights(expected), final_weights(got)
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def one_process(tiny_pair, tmp_path_factory) -> Path:
    """The reference: one process, the whole global batch, per-prompt rollouts."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    config = load_config(write_config(tiny_pair, run_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "rollout", per_prompt_rollout(loop.rollout))
        return loop.train(config)


@pytest.fixture(scope="module")
def fsdp2_run(tiny_pair, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp2")
    run_dir = tmp / "run"
    done = harness(tmp, write_config(tiny_pair, run_dir, "distributed.strategy=fsdp2"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(strategy, one_process, fsdp2_run, tiny_pair, tmp_path):
    if strategy == "fsdp2":
        run_dir = fsdp2_run
    else:
        run_dir = tmp_path / "run"
        done = harness(
            tmp_path, write_config(tiny_pair, run_dir, f"distributed.strategy={strategy}")
        )
        assert done.returncode == 0, done.stderr[-3000:]
    logged = {k for k in read_metrics(run_dir)[1] if not k.startswith("time_")}
    assert logged - {"step"} <= set(GLOBAL_KEYS)
    assert_same_run(one_process, run_dir, GLOBAL_KEYS, rel=1e-4, atol=5e-5)
    # Rank 0 alone writes the logs: one record per step, its own samples.
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2, 3, 4]
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 2
    assert (run_dir / "checkpoints" / "step_0000004" / ".metadata").is_file()


@pytest.mark.slow
def test_killed_two_rank_run_resumes_like_the_uninterrupted_run(fsdp2_run, tiny_pair, tmp_path):
    """SIGKILL both ranks when step 3 starts (after the step-2 checkpoint); resume on two
    ranks matches the uninterrupted run; resume of the same checkpoint on one process
    (DCP reshards) matches it up to the world-size tolerance."""
    killed = tmp_path / "killed"
    config = write_config(tiny_pair, killed, "distributed.strategy=fsdp2")
    died = harness(tmp_path, config, "--die-at", "3")
    assert died.returncode != 0
    assert [m["step"] for m in read_metrics(killed)] == [0, 1, 2]
    assert not (killed / "final").exists()
    single = tmp_path / "single"
    shutil.copytree(killed, single)

    resumed = harness(tmp_path, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = read_metrics(fsdp2_run)
    keys = {k for k in expected[1] if not k.startswith("time_")}
    assert_same_run(fsdp2_run, killed, keys, rel=1e-6, atol=1e-6)

    single_config = load_config(config, [f"run.output_dir={single}"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "rollout", per_prompt_rollout(loop.rollout))
        loop.train(single_config, resume=True)
    assert_same_run(fsdp2_run, single, GLOBAL_KEYS, rel=1e-4, atol=5e-5)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_after_the_same_step(fsdp2_run, tiny_pair, tmp_path):
    """Rank 1 alone gets SIGTERM in step 3: both ranks finish step 3, write its sharded
    checkpoint and exit 75; resuming matches the uninterrupted run."""
    run_dir = tmp_path / "run"
    config = write_config(tiny_pair, run_dir, "distributed.strategy=fsdp2")
    stopped = harness(tmp_path, config, "--term-at", "3")
    assert stopped.returncode != 0
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]
    assert (list_checkpoints(run_dir)[-1] / ".metadata").is_file()
    assert list_checkpoints(run_dir)[-1].name == "step_0000003"
    assert re.search(rf"exitcode\s*:\s*{EXIT_STOPPED}\b", stopped.stderr), stopped.stderr[-3000:]

    resumed = harness(tmp_path, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = {k for k in read_metrics(fsdp2_run)[1] if not k.startswith("time_")}
    assert_same_run(fsdp2_run, run_dir, keys, rel=1e-6, atol=1e-6)


@pytest.mark.slow
def test_eval_reads_a_sharded_checkpoint(fsdp2_run, capsys):
    """The last checkpoint of a 2-rank FSDP2 run (DCP shards) loads into one process with the
    weights the run exported, and `tropd eval` scores it."""
    checkpoint = list_checkpoints(fsdp2_run)[-1]
    assert not (checkpoint / "model.safetensors").exists()
    model, _, config = load_eval_model(str(checkpoint), device="cpu")
    assert config.task.name == "add"
    loaded = model.state_dict()
    for name, tensor in final_weights(fsdp2_run).items():
        assert torch.equal(loaded[name], tensor), name
    assert cli_main(["eval", str(checkpoint), "--num-items", "2", "--max-new-tokens", "4"]) == 0
    assert '"mean"' in capsys.readouterr().out


def start_nproc(tiny_pair, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`tropd train --nproc 2` of a long run, returned once the ranks have logged a step."""
    run_dir = tmp_path / "run"
    config = write_config(tiny_pair, run_dir, "run.steps=1000", "run.save_every=0", "eval.every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    with open(tmp_path / "stderr.txt", "w") as stderr:  # read back once the launcher exits
        launcher = subprocess.Popen(
            [sys.executable, "-m", "tropd", "train", str(config), "--nproc", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.1)
    assert launcher.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
    return launcher, run_dir


@pytest.mark.slow
def test_sigterm_to_the_nproc_launcher_stops_the_ranks_with_a_checkpoint(tiny_pair, tmp_path):
    launcher, run_dir = start_nproc(tiny_pair, tmp_path)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert launcher.returncode == EXIT_STOPPED, err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    last = read_metrics(run_dir)[-1]["step"]
    assert f"SIGTERM: stopped after step {last} with checkpoint" in err
    assert list_checkpoints(run_dir)[-1].name == f"step_{last:07d}"
    lock_run_dir(run_dir).close()  # released


def alive(pid: int) -> bool:
    """Whether any thread of `pid` runs (a zombie, dead but not yet reaped, does not). The
    main thread of a killed process can be a zombie while its other threads still exit,
    holding the process's files, and so the run folder's lock."""
    return any(running(stat) for stat in Path(f"/proc/{pid}/task").glob("*/stat"))


def running(stat: Path) -> bool:
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:  # the thread is gone
        return False


@pytest.mark.slow
def test_ranks_die_with_a_killed_launcher(tiny_pair, tmp_path):
    launcher, run_dir = start_nproc(tiny_pair, tmp_path)
    ranks = [
        int(pid)
        for task in Path(f"/proc/{launcher.pid}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    assert len(ranks) == 2 and all(alive(pid) for pid in ranks)
    launcher.kill()
    launcher.wait()
    tic = time.monotonic()
    while any(alive(pid) for pid in ranks) and time.monotonic() - tic < 10:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks), "a rank outlived its launcher by 10 s"
    lock_run_dir(run_dir).close()  # a new job may take the run folder


@pytest.mark.slow
def test_nproc_launches_mixed_precision_fsdp2(tiny_pair, tmp_path, monkeypatch):
    """`tropd train --nproc 2` runs torchrun itself; bf16 FSDP2 trains with finite losses
    and exports a float32 student. Each rank's teacher writes both steps' prefixes at the
    first (`guidance.write_ahead`, on outside the harness)."""
    run_dir = tmp_path / "run"
    config = write_config(
        tiny_pair,
        run_dir,
        "run.steps=2",
        "eval.every=0",
        "distributed.strategy=fsdp2",
        "distributed.mixed_precision=true",
        "guidance.write_ahead=2",
        "guidance.schedule=constant",
        "guidance.prefix=cap",  # every guided row keeps all but the last teacher token
    )
    (tmp_path / "scratch").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli_main(["train", str(config), "--nproc", "2"]) == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert all(m["prefix_len_mean"] > 0 for m in metrics)  # both steps guided
    assert next(iter(final_weights(run_dir).values())).dtype == torch.float32


STUCK_TIMEOUT_S = 5


def test_a_stuck_rank_fails_the_run_within_the_timeout(tmp_path):
    """Rank 1 stops answering after a first collective: rank 0 fails with one line after
    `distributed.timeout_s`, counted from there, and the run ends. Both ranks meet in a
    folder before joining the group, so a rank slow to import torch on a loaded machine
    cannot use up the timeout in the rendezvous."""
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            from pathlib import Path
            import torch, torch.distributed as dist
            from tropd.config import load_config
            from tropd.train.distributed import process_group

            ready, started = Path(sys.argv[1]), Path(sys.argv[2])
            (ready / os.environ["RANK"]).touch()
            while len(list(ready.iterdir())) < 2:
                time.sleep(0.05)
            config = load_config(
                None,
                [
                    "distributed.timeout_s={STUCK_TIMEOUT_S}",
                    "rollout.prompts_per_step=2",
                    "model.device=cpu",
                ],
            )
            with process_group(config) as (rank, world_size):
                dist.barrier()
                if rank == 0:
                    started.write_text(str(time.time()))
                else:
                    time.sleep(600)
                dist.all_reduce(torch.ones(1))
            """
        )
    )
    (tmp_path / "ready").mkdir()
    started = tmp_path / "started"
    done = run_ranks(tmp_path, str(script), str(tmp_path / "ready"), str(started))
    waited = time.time() - float(started.read_text())
    assert done.returncode != 0
    assert f"did not answer within distributed.timeout_s={STUCK_TIMEOUT_S} s" in done.stderr
    # The collective began after `started`; the launcher then stops the stuck rank at once.
    assert STUCK_TIMEOUT_S <= waited < STUCK_TIMEOUT_S + 30, waited


def test_a_stopped_rank_frees_its_model_before_the_group(tmp_path):
    """A run left by an exception (RunStopped here) frees the DDP wrapper its frames hold
    before the process group goes. Freed after it, the wrapper's reducer would drop the
    group's last reference with the GIL held, and the gloo group's destructor can then wait
    forever for its worker thread: a rank that hung after writing its checkpoint."""
    script = tmp_path / "stopped.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, weakref
            from pathlib import Path
            import torch, torch.distributed as dist
            from tropd.config import load_config
            from tropd.train import distributed
            from tropd.train.shutdown import RunStopped

            config = load_config(None, ["rollout.prompts_per_step=2", "model.device=cpu"])
            wrappers = []

            def train():
                model = distributed.parallelize(torch.nn.Linear(2, 2), config.distributed)
                model(torch.ones(1, 2)).sum().backward()
                wrappers.append(weakref.ref(model))
                raise RunStopped("SIGTERM", 1, Path("checkpoint"))

            def destroy(destroy=dist.destroy_process_group):
                alive = wrappers[0]() is not None
                Path(sys.argv[1], os.environ["RANK"]).write_text(str(alive))
                destroy()

            dist.destroy_process_group = destroy
            try:
                with distributed.process_group(config):
                    train()
            except RunStopped:
                pass
            """
        )
    )
    done = run_ranks(tmp_path, str(script), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / rank).read_text() for rank in "01"] == ["False", "False"]


def test_world_size_must_split_the_prompts():
    config = load_config(None, ["rollout.prompts_per_step=6"])
    with pytest.raises(ConfigError, match="multiple of 4"):
        distributed.check_world_size(config, 4)
    with pytest.raises(ConfigError, match=r"model\.device"):
        distributed.check_world_size(load_config(None, ["model.device=cuda:1"]), 2)


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    """`auto` on a machine with one GPU and a second process: a config error naming the
    fix, before any model loads (CUDA would fail later with 'invalid device ordinal')."""
    monkeypatch.setattr(distributed, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"--nproc-per-node=1\) or set model\.device=cpu"):
        distributed.check_world_size(load_config(None, ["rollout.prompts_per_step=2"]), 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.check_world_size(load_config(None, ["rollout.prompts_per_step=2"]), 2)


def test_mixed_precision_needs_fsdp2():
    with pytest.raises(ConfigError, match="distributed: mixed_precision needs strategy fsdp2"):
        load_config(None, ["distributed.mixed_precision=true"])


def test_nproc_under_torchrun_is_a_usage_error(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("run: {steps: 1}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(["train", str(config), "--nproc", "2"]) == 2
    assert "leave it out under torchrun" in capsys.readouterr().err


def test_single_process_helpers_change_nothing():
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.all_reduce_sum(3.5) == 3.5
    assert distributed.sum_over_ranks({"a": 1.0}) == {"a": 1.0}
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_from_main("x") == "x"
    assert distributed.full_state_dict(torch.nn.Linear(2, 2)) is None
    assert distributed.parallelize(torch.nn.Linear(2, 2), load_config().distributed) is None
