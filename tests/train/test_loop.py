"""End-to-end training on tiny models: learning, resume, non-finite steps, outputs; the
objective settings checked where the run is built."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    assert_resumed_run_matches,
    interrupted_run,
    one_line,
    read_metrics,
    tiny_config,
)
from transformers import AutoModelForCausalLM

from tropd import cli
from tropd.config import GUIDANCE_DEFAULTS, Config, ConfigError, load_config
from tropd.rollout import HFEngine
from tropd.rollout.blend import BlendEngine
from tropd.train import loop
from tropd.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def sharp_pair(tiny_pair, tmp_path_factory) -> tuple[str, str]:
    """A teacher with peaked (low-entropy) distributions, so it differs clearly from the
    random student: its output embedding is scaled up."""
    teacher_dir, student_dir = tiny_pair
    out = tmp_path_factory.mktemp("sharp") / "teacher"
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(8.0)
    teacher.save_pretrained(out)
    return str(out), student_dir


def make_config(pair, run_dir: Path, *overrides: str):
    return tiny_config(
        pair,
        run_dir,
        "rollout.prompts_per_step=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=8",
        "teacher.top_k=8",
        "eval.num_prompts=32",
        *overrides,
    )


# --- objective settings -------------------------------------------------------------


def objective_error(path=None, overrides=()) -> str:
    config = load_config(path, list(overrides))
    with pytest.raises(ConfigError) as info:
        loop.objective_from_config(config)
    return one_line(info)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("objective.options.beta=2", ["objective.options", "beta"]),
        ("objective.options.beta=-0.5", ["objective.options", "beta"]),
        ("objective.options.bogus=1", ["objective.options", "bogus"]),
        ("objective.name=nosuchmethod", ["objective.name", "nosuchmethod", "tropd"]),
    ],
)
def test_bad_objective_settings_name_their_key(override: str, names: list[str]) -> None:
    message = objective_error(overrides=[override])
    for name in names:
        assert name in message, f"{name!r} missing from {message!r}"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("objective.options.beta=2", ["objective.options", "beta"]),
        ("objective.name=nosuchmethod", ["objective.name"]),
    ],
)
def test_bad_objective_in_a_big_yaml_stays_short(
    tmp_path: Path, override: str, names: list[str]
) -> None:
    # The message names the bad key; it does not echo the whole config back.
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(Config().model_dump(mode="json")))
    message = objective_error(path, [override])
    for name in names:
        assert name in message
    assert "output_dir" not in message
    assert len(message) < 300


def test_bad_objective_stops_the_run_before_its_folder_exists(tmp_path: Path) -> None:
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}", "objective.name=nope"])
    with pytest.raises(ConfigError, match=r"^objective\.name"):
        loop.train(config)
    assert not (tmp_path / "run").exists()


# --- what samples the student ----------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "engine", "sampler"),
    [
        ("opd", "hf", "hf"),
        ("opd", "vllm", "vllm"),
        ("trb", "hf", "blend"),
        ("trb", "vllm", "blend"),
    ],
)
def test_the_sampler_is_chosen_once_per_run(objective, engine, sampler) -> None:
    config = load_config(None, [f"objective.name={objective}", f"rollout.engine={engine}"])
    assert loop.choose_sampler(config, loop.objective_from_config(config)) == sampler


def test_vllm_gets_the_weights_only_when_it_samples(tiny_pair, tmp_path) -> None:
    # trb samples from the blend: no vLLM engine is built (none is installed here).
    config = make_config(tiny_pair, tmp_path, "objective.name=trb", "rollout.engine=vllm")
    setup = loop.build(config, tmp_path)
    assert setup.sampler == "blend" and setup.vllm is None
    assert isinstance(loop.student_engine(setup, step=1), BlendEngine)

    class FakeVLLM:
        pushed = 0

        def push_weights(self, weights) -> None:
            self.pushed += len(list(weights))

    setup.sampler, setup.vllm = "vllm", FakeVLLM()
    assert loop.student_engine(setup, step=1) is setup.vllm
    assert setup.vllm.pushed == len(list(setup.student.parameters()))
    setup.sampler = "blend"
    assert isinstance(loop.student_engine(setup, step=2), BlendEngine)
    assert setup.vllm.pushed == len(list(setup.student.parameters()))


@pytest.mark.parametrize("objective", ["opd", "tropd"])
def test_reverse_kl_on_heldout_prompts_falls(sharp_pair, tmp_path, objective):
    config = make_config(
        sharp_pair,
        tmp_path / objective,
        "run.steps=20",
        "run.save_every=0",
        "eval.every=20",
        "optim.lr=1e-2",
        f"objective.name={objective}",
    )
    run_dir = loop.train(config)
    evals = [m for m in read_metrics(run_dir) if "eval/reverse_kl" in m]
    before, after = evals[0]["eval/reverse_kl"], evals[-1]["eval/reverse_kl"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert after < 0.6 * before, (before, after)


def test_every_step_has_student_tokens_under_tropds_defaults(sharp_pair, tmp_path):
    # Guidance as the defaults set it never makes a step pure SFT on teacher text: each
    # rollout keeps some student tokens, from the first step (largest prefix cap) on.
    config = make_config(
        sharp_pair, tmp_path / "run", "run.steps=4", "run.save_every=0", "eval.every=0"
    )
    assert config.objective.name == "tropd" and config.guidance.full_prefix is None
    metrics = read_metrics(loop.train(config))
    assert metrics[0]["prefix_len_mean"] > 0, "the first step is guided"
    for record in metrics:
        assert record["student_tokens"] > 0 and record["off_policy_fraction"] == 0.0


def test_run_directory_contents(sharp_pair, tmp_path):
    config = make_config(
        sharp_pair, tmp_path / "run", "run.steps=3", "run.save_every=2", "eval.every=0"
    )
    run_dir = loop.train(config)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    required = {
        "step",
        "loss",
        "grad_norm",
        "reward_mean",
        "trust_fraction",
        "outlier_fraction",
        "student_entropy",
        "prefix_cap",
        "prefix_len_mean",
        "skipped_steps",
    }
    assert required <= set(metrics[0])
    # the default cap is a share of each teacher response, from all of it to none
    assert metrics[0]["prefix_cap"] == 1.0 and metrics[-1]["prefix_cap"] == 0.0
    assert load_config(run_dir / "config.yaml") == config
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "teacher_prefix", "student"} <= set(samples[0])
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002", "step_0000003"]
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert (
        final.config.vocab_size
        == AutoModelForCausalLM.from_pretrained(sharp_pair[1]).config.vocab_size
    )
    with pytest.raises(ConfigError, match="--resume"):
        loop.train(config)


def test_resume_after_interruption_matches_uninterrupted_run(sharp_pair, tmp_path, monkeypatch):
    common = ("run.steps=5", "run.save_every=2", "eval.every=5", "optim.lr=1e-2")
    full = loop.train(make_config(sharp_pair, tmp_path / "full", *common))

    partial_config = make_config(sharp_pair, tmp_path / "killed", *common)
    interrupted_run(monkeypatch, partial_config, at_step=4)  # after step 2's checkpoint
    assert [m["step"] for m in read_metrics(tmp_path / "killed")] == [0, 1, 2, 3]
    resumed = loop.train(partial_config, resume=True)
    assert [m["step"] for m in read_metrics(resumed)] == [0, 1, 2, 3, 4, 5]
    assert_resumed_run_matches(full, resumed)


@pytest.mark.parametrize("ahead", [1, 3])
def test_teacher_prefixes_are_written_once_per_group_and_again_alike(
    sharp_pair, tmp_path, monkeypatch, ahead
):
    """`guidance.write_ahead`: the teacher's loop runs at the first step of each group of
    that many steps (over all their guided rows), and a setup built fresh inside a group
    (a resumed run) samples that step's rollouts and teacher scores exactly as the run
    that went through the group's first steps."""
    calls = []
    real = HFEngine.generate_keeping_state

    def counting(self, prompts, params):
        calls.append(len(prompts))
        return real(self, prompts, params)

    monkeypatch.setattr(HFEngine, "generate_keeping_state", counting)
    config = make_config(
        sharp_pair, tmp_path, "run.steps=5", f"guidance.write_ahead={ahead}", "optim.lr=0.05"
    )
    batches, guided = {}, {}
    setup = loop.build(config, tmp_path / "a")
    for step in range(1, 6):
        loop.seed_everything(config.run.seed, step, 0)
        prompts = loop.prompts_for_step(setup.train_prompts, step, 8, 0, 1)
        batch, cap = loop.rollout(setup, prompts, step)
        batches[step] = loop.score_teacher(setup, batch)
        guided[step] = (batch.teacher_cache.rows if batch.teacher_cache else [], cap)
    # The cosine cap is 0 at the last step: nobody is guided there.
    assert guided[5] == ([], 0.0) and all(len(guided[s][0]) == 16 for s in range(1, 5))
    assert calls == ([16] * 4 if ahead == 1 else [48, 16])
    calls.clear()
    again = loop.build(config, tmp_path / "b")  # the student is the same: no step trained
    loop.seed_everything(config.run.seed, 2, 0)
    batch, _ = loop.rollout(again, loop.prompts_for_step(again.train_prompts, 2, 8, 0, 1), 2)
    assert calls == ([16] if ahead == 1 else [48])  # the group written again
    batch = loop.score_teacher(again, batch)
    for name in ("tokens", "origin", "sampler_logprobs", "teacher_logprobs", "teacher_entropy"):
        torch.testing.assert_close(getattr(batch, name), getattr(batches[2], name), rtol=0, atol=0)


def poison_objective(monkeypatch) -> dict:
    """Make every loss of the next run non-finite; returns what the run started with
    (`before`: the student's weights) and the student."""
    real_build = loop.build
    captured = {}

    def build_with_poisoned_objective(config, run_dir):
        setup = real_build(config, run_dir)
        objective = setup.objective
        captured["before"] = {k: v.clone() for k, v in setup.student.state_dict().items()}
        captured["student"] = setup.student
        captured["optimizer"] = setup.optimizer

        class Poisoned:
            def __getattr__(self, name):
                return getattr(objective, name)

            def __call__(self, logits, batch, **kw):
                out = objective(logits, batch, **kw)
                out.loss = out.loss * float("nan")
                return out

        setup.objective = Poisoned()
        return setup

    monkeypatch.setattr(loop, "build", build_with_poisoned_objective)
    return captured


def test_non_finite_loss_skips_the_step_without_touching_weights(sharp_pair, tmp_path, monkeypatch):
    config = make_config(
        sharp_pair,
        tmp_path / "nan",
        "run.steps=2",
        "run.save_every=0",
        "eval.every=0",
        "objective.name=opd",
    )
    captured = poison_objective(monkeypatch)
    loop.train(config)
    metrics = read_metrics(tmp_path / "nan")
    assert [m["skipped"] for m in metrics] == [True, True]
    assert metrics[-1]["skipped_steps"] == 2
    after = captured["student"].state_dict()
    for name, tensor in captured["before"].items():
        assert torch.equal(after[name], tensor), name


def test_skipped_steps_keep_the_schedule_and_warn_nothing(sharp_pair, tmp_path, monkeypatch):
    """A skipped step leaves the optimizer's state alone, the learning rate still follows the
    step number, and torch sees no scheduler step before an optimizer step."""
    config = make_config(
        sharp_pair,
        tmp_path / "nan",
        "run.steps=3",
        "run.save_every=0",
        "eval.every=0",
        "optim.schedule=cosine",
        "optim.lr=0.01",
    )
    captured = poison_objective(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.train(config)
    ours = [w for w in caught if "lr_scheduler" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    assert not captured["optimizer"].state  # never updated: no moments, no step count
    metrics = read_metrics(tmp_path / "nan")
    for record in metrics:
        # `record["lr"]` is the rate for the next step: the schedule at `step` (0-based),
        # the same float64 product LambdaLR forms, so exactly equal.
        assert record["lr"] == 0.01 * loop.lr_factor(record["step"], 0, 3, "cosine")


def test_a_run_with_every_step_skipped_fails_with_one_line(
    sharp_pair, tmp_path, monkeypatch, capsys
):
    config = make_config(sharp_pair, tmp_path / "nan", "run.steps=2", "eval.every=0")
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    poison_objective(monkeypatch)
    assert cli.main(["train", str(path)]) == cli.EXIT_FAIL
    message = capsys.readouterr().err
    assert "every step" in message and "optim.lr" in message and "done" not in message


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_its_checkpoint(
    sharp_pair, tmp_path, monkeypatch, capsys
):
    config = make_config(
        sharp_pair,
        tmp_path / "nan",
        "run.steps=6",
        "run.save_every=1",
        "run.keep_checkpoints=6",
        "eval.every=0",
        "objective.name=opd",
        "optim.max_skipped_steps_in_row=3",
    )
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    captured = poison_objective(monkeypatch)
    assert cli.main(["train", str(path)]) == cli.EXIT_FAIL
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "steps 1-3 were all skipped" in lines[0], lines
    assert "max_skipped_steps_in_row" in lines[0]
    assert [m["step"] for m in read_metrics(tmp_path / "nan")] == [1, 2, 3]
    assert read_metrics(tmp_path / "nan")[-1]["skipped_steps"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "nan")][-1] == "step_0000003"
    assert not (tmp_path / "nan" / "final").exists()
    after = captured["student"].state_dict()
    for name, tensor in captured["before"].items():
        assert torch.equal(after[name], tensor), name


def test_resume_before_the_first_checkpoint_writes_step_0_once(sharp_pair, tmp_path, monkeypatch):
    config = make_config(sharp_pair, tmp_path / "run", "run.steps=2", "eval.every=2")

    def dies(setup, step, rank, world_size):
        raise KeyboardInterrupt  # after step 0's evaluation, before any checkpoint

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [0]
    monkeypatch.setattr(loop, "train_step", real_step)
    loop.train(config, resume=True)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_a_prompt_longer_than_the_models_positions_is_one_line(sharp_pair, tmp_path):
    config = make_config(sharp_pair, tmp_path / "long", "task.options.digits=1000")
    with pytest.raises(ConfigError) as info:
        loop.train(config)
    message = one_line(info)
    assert "256 positions" in message and "task.truncate_prompts: left" in message
    assert "rollout.max_new_tokens 8" in message


def test_prompts_cut_on_the_left_keep_room_for_the_response(sharp_pair, tmp_path):
    config = make_config(
        sharp_pair, tmp_path / "left", "task.options.digits=1000", "task.truncate_prompts=left"
    )
    setup = loop.build(config, tmp_path)
    lengths = [len(p) for p in setup.train_prompts + setup.eval_prompts]
    assert max(lengths) == 256 - 8
    full = loop.encode_prompt(setup.tokenizer, setup.train_items[0])
    assert setup.train_prompts[0] == full[-len(setup.train_prompts[0]) :]


def test_fit_prompts_without_room_names_the_budget():
    with pytest.raises(ConfigError) as info:
        loop.fit_prompts([[1]], [None], 16, 16, "eval.max_new_tokens", Config().task)
    assert "eval.max_new_tokens: 16 new tokens leave no room" in one_line(info)


def test_an_output_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "file" / "run", tmp_path / ("x" * 300)):
        config = load_config(None, [f"run.output_dir={where}"])
        with pytest.raises(ConfigError) as info:
            loop.prepare_run_dir(config, resume=False)
        assert "run.output_dir" in one_line(info)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(sharp_pair, tmp_path):
    """A real `kill -9` of `tropd train` after its first checkpoint; `--resume` finishes the
    run with the metrics and weights of an uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    common = ("run.steps=6", "run.save_every=2", "eval.every=3", "optim.lr=1e-2")
    expected = read_metrics(loop.train(make_config(sharp_pair, tmp_path / "full", *common)))

    config = make_config(sharp_pair, tmp_path / "killed", *common)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [sys.executable, "-m", "tropd", "train", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "killed") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(tmp_path / "killed"), "no checkpoint before the deadline"
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before the kill"

    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = read_metrics(tmp_path / "killed")
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got, strict=True):
        for key in (k for k in a if not k.startswith("time_")):  # timings differ
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.mark.parametrize(
    ("objective", "overrides", "expected"),
    [
        ("tropd", [], {"schedule": "cosine", "prefix": "uniform", "guided_fraction": 0.5}),
        ("seqkd", [], {"schedule": "constant", "prefix": "cap", "full_prefix": True}),
        ("opd", [], {"schedule": "cosine", "prefix": "cap", "guided_fraction": 1.0}),
        ("tropd", ["guidance.prefix=cap", "guidance.guided_fraction=1"], {"prefix": "cap"}),
        ("seqkd", ["guidance.full_prefix=false"], {"full_prefix": False}),
    ],
)
def test_null_guidance_settings_take_the_objectives_defaults(objective, overrides, expected):
    config = make_config(("t", "s"), Path("run"), f"objective.name={objective}", *overrides)
    settings = loop.guidance_settings(config, loop.objective_from_config(config))
    assert set(settings) == set(GUIDANCE_DEFAULTS)
    assert {k: settings[k] for k in expected} == expected
    if objective != "seqkd":
        assert settings["full_prefix"] is False  # no pure-SFT rollouts unless asked for
