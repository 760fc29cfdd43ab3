"""`tropd train`'s arguments: the config file, key=value settings and the options, in any
order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tropd import cli
from tropd.train import distributed


@pytest.fixture
def calls(tmp_path, monkeypatch) -> list[dict]:
    """What `tropd train` asked of the layer below: train (one process) or launch (several)."""
    seen: list[dict] = []

    def fake_train(config, resume=False, rank=0, world_size=1):
        seen.append({"config": config, "resume": resume})
        run_dir = Path(config.run.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")
        return run_dir

    def fake_launch(nproc, tropd_args, *timeout):
        seen.append({"nproc": nproc, "args": tropd_args})
        return 0

    monkeypatch.setattr("tropd.train.train", fake_train)
    monkeypatch.setattr(distributed, "launch", fake_launch)
    monkeypatch.setattr(distributed, "check_world_size", lambda config, nproc: None)
    return seen


@pytest.fixture
def config_file(tmp_path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"run:\n  output_dir: {tmp_path / 'run'}\n  steps: 3\n")
    return str(path)


@pytest.mark.parametrize(
    "order",
    [
        ["CFG", "optim.lr=0.01", "run.seed=7", "--resume"],
        ["optim.lr=0.01", "CFG", "--resume", "run.seed=7"],
        ["--resume", "optim.lr=0.01", "run.seed=7", "CFG"],
        ["optim.lr=0.01", "--resume", "CFG", "run.seed=7"],
    ],
)
def test_train_takes_its_arguments_in_any_order(calls, config_file, order):
    argv = ["train", *(config_file if a == "CFG" else a for a in order)]
    assert cli.main(argv) == cli.EXIT_OK
    [call] = calls
    assert call["resume"] is True
    assert call["config"].optim.lr == 0.01 and call["config"].run.seed == 7
    assert call["config"].run.steps == 3  # read from the file


@pytest.mark.parametrize(
    "order",
    [
        ["CFG", "--nproc", "2", "run.seed=7", "optim.lr=0.01"],
        ["run.seed=7", "CFG", "--resume", "--nproc", "2", "optim.lr=0.01"],
        ["--nproc", "2", "run.seed=7", "optim.lr=0.01", "CFG", "--resume"],
    ],
)
def test_nproc_relaunches_with_the_config_and_the_overrides_in_their_order(
    calls, config_file, order
):
    argv = ["train", *(config_file if a == "CFG" else a for a in order)]
    assert cli.main(argv) == cli.EXIT_OK
    [call] = calls
    resume = ["--resume"] if "--resume" in order else []
    assert call == {
        "nproc": 2,
        "args": ["train", config_file, "run.seed=7", "optim.lr=0.01", *resume],
    }


def test_later_overrides_win_wherever_the_config_stands(calls, config_file):
    assert cli.main(["train", "run.seed=1", config_file, "--resume", "run.seed=2"]) == 0
    assert calls[0]["config"].run.seed == 2


def test_a_config_path_with_an_equals_sign_is_still_the_config(calls, tmp_path):
    folder = tmp_path / "lr=0.1"
    folder.mkdir()
    path = folder / "cfg.yaml"
    path.write_text(f"run:\n  output_dir: {tmp_path / 'run'}\n  seed: 5\n")
    assert cli.main(["train", "optim.lr=0.01", str(path)]) == 0
    assert calls[0]["config"].run.seed == 5


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        (["a.yaml", "b.yaml"], "got a.yaml, b.yaml"),
        (["optim.lr=0.1"], "got none"),
    ],
)
def test_train_needs_exactly_one_config_file(calls, capsys, arguments, shown):
    assert cli.main(["train", *arguments]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "one CONFIG file" in err and shown in err and len(err.strip().splitlines()) == 1
    assert not calls


def test_unknown_options_are_still_refused(calls, config_file, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", config_file, "--bogus", "run.seed=1"])
    assert info.value.code == cli.EXIT_USAGE
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not calls
