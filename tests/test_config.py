"""Config loading and validation, the CLI's handling of bad configs, and the model checks
that run before any weights are loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import one_line, save_tiny_model

import tropd
from tropd.cli import main
from tropd.config import Config, ConfigError, load_config, save_config
from tropd.tasks import get_task
from tropd.train import loop

# --- defaults, YAML, overrides -----------------------------------------------------


def test_defaults_validate() -> None:
    config = load_config()
    assert config == Config()
    assert config.objective.name == "tropd"
    assert config.guidance.enabled is None
    assert config.optim.lr > 0


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "run.yaml",
        {
            "run": {"steps": 7, "output_dir": "runs/x"},
            "optim": {"lr": 0.5, "schedule": "cosine"},
            "rollout": {"max_new_tokens": 24},
        },
    )
    config = load_config(
        path,
        [
            "optim.lr=1e-4",
            "guidance.enabled=false",
            "objective.options.beta=0.01",
            "rollout.samples_per_prompt=2",
            "optim.betas=[0.8, 0.95]",
        ],
    )
    assert isinstance(config.optim.lr, float) and config.optim.lr == 1e-4  # override wins
    assert config.guidance.enabled is False
    assert config.objective.options == {"beta": 0.01}
    assert isinstance(config.objective.options["beta"], float)
    assert config.rollout.samples_per_prompt == 2
    assert config.optim.betas == (0.8, 0.95)
    # Untouched YAML values and defaults survive.
    assert config.run.steps == 7 and config.run.output_dir == "runs/x"
    assert config.optim.schedule == "cosine"
    assert config.rollout.max_new_tokens == 24
    assert config.teacher.top_k == Config().teacher.top_k


@pytest.mark.parametrize(
    ("override", "section", "key", "value"),
    [
        ("optim.lr=1e-4", "optim", "lr", 1e-4),
        ("optim.lr=3E-5", "optim", "lr", 3e-5),
        ("optim.lr=0.001", "optim", "lr", 0.001),
        ("guidance.enabled=true", "guidance", "enabled", True),
        ("guidance.enabled=null", "guidance", "enabled", None),
        ("run.steps=12", "run", "steps", 12),
        ("eval.max_new_tokens=null", "eval", "max_new_tokens", None),
        ("model.student=some/model-1.5B", "model", "student", "some/model-1.5B"),
    ],
)
def test_override_values_are_parsed(override: str, section: str, key: str, value) -> None:
    got = getattr(getattr(load_config(None, [override]), section), key)
    assert got == value and type(got) is type(value)


def test_exponent_floats_inside_objective_options_are_numbers() -> None:
    # YAML 1.1 reads 1e-3 as a string; the objective options are an untyped dict.
    options = load_config(None, ["objective.options.beta=1e-3"]).objective.options
    assert options == {"beta": 0.001} and isinstance(options["beta"], float)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "optim.lr=2e-5",
            "optim.betas=[0.9, 0.95]",
            "objective.name=opd",
            "objective.options.kl_coef=0.5",
            "guidance.enabled=false",
            "eval.max_new_tokens=32",
            "task.options={digits: 3}",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again == config
    assert again.model_dump() == config.model_dump()
    assert not list(tmp_path.glob("*.tmp")), "the atomic write leaves no temporary file"


def test_empty_yaml_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


# --- errors --------------------------------------------------------------------------


def config_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return one_line(info)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("optim.lrr=1", ["optim.lrr", "unknown"]),
        ("nosuchsection.x=1", ["nosuchsection"]),
        ("rollout.max_new_tokens=abc", ["rollout.max_new_tokens", "abc"]),
        ("optim.lr=-1", ["optim.lr"]),
        ("optim.lr=0", ["optim.lr"]),
        ("rollout.top_p=1.5", ["rollout.top_p"]),
        ("guidance.guided_fraction=2", ["guidance.guided_fraction"]),
        ("guidance.prefix=sometimes", ["guidance.prefix"]),
        ("guidance.initial_cap=0", ["guidance.initial_cap"]),
        ("optim.lr=.inf", ["optim.lr"]),
        ("optim.lr=1e400", ["optim.lr"]),
        ("optim.weight_decay=.nan", ["optim.weight_decay"]),
        ("rollout.temperature=.inf", ["rollout.temperature"]),
        ("run.steps=true", ["run.steps", "number"]),
        ("optim.lr=true", ["optim.lr", "number"]),
        ("guidance.initial_cap=false", ["guidance.initial_cap", "number"]),
        ("guidance.cap_unit=words", ["guidance.cap_unit"]),
        ("teacher.top_k=0", ["teacher.top_k"]),
        ("run.steps=1000000000000", ["run.steps", "less than or equal to 10000000"]),
        ("eval.num_prompts=1000000000", ["eval.num_prompts"]),
        ("rollout.prompts_per_step=1000000000", ["rollout.prompts_per_step"]),
        ("rollout.max_new_tokens=1000000000000", ["rollout.max_new_tokens"]),
        ("eval.samples=1000000000", ["eval.samples"]),
        ("run.seed=1180591620717411303424", ["run.seed"]),
        ("distributed.timeout_s=1000000000000", ["distributed.timeout_s"]),
        ("optim.betas=[1, 2]", ["optim.betas", "[0, 1)"]),
        ("model.device=meta", ["model.device", "cuda:N"]),
        ("optim.max_skipped_steps_in_row=0", ["optim.max_skipped_steps_in_row"]),
        ("task.truncate_prompts=right", ["task.truncate_prompts"]),
    ],
)
def test_bad_values_name_their_key(override: str, names: list[str]) -> None:
    message = config_error(overrides=[override])
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["run.steps=1000000", "rollout.prompts_per_step=8"], ["run.steps * rollout.prompts"]),
        (
            ["run.steps=1", "rollout.prompts_per_step=65536", "rollout.samples_per_prompt=64"],
            ["rollout.prompts_per_step * rollout.samples_per_prompt"],
        ),
    ],
)
def test_products_too_large_to_hold_are_refused(overrides: list[str], names: list[str]) -> None:
    message = config_error(overrides=overrides)
    for name in names:
        assert name in message
    assert len(message) < 200  # the config itself is not echoed


def test_a_long_value_is_shortened_in_the_message() -> None:
    message = config_error(overrides=["run.steps=" + "x" * 10_000])
    assert "run.steps" in message and len(message) < 200


def test_a_fractional_initial_cap_is_at_most_one() -> None:
    message = config_error(overrides=["guidance.cap_unit=fraction", "guidance.initial_cap=2"])
    assert "guidance" in message and "initial_cap" in message and "(0, 1]" in message


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


@pytest.mark.parametrize("override", ["optim.lr", "=3", ""])
def test_malformed_override(override: str) -> None:
    message = config_error(overrides=[override])
    assert "key=value" in message


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n  lr: 1.0e-2\n")
    message = config_error(path)
    assert "duplicate key 'lr'" in message and "line 3" in message


ALIAS_BOMB = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 10)}]\n" for i in range(9)
)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (ALIAS_BOMB, ["bomb.yaml", "line", "aliases are expanded"]),
        ("task:\n  options: &a {x: [*a]}\n", ["bomb.yaml", "recursive alias"]),
        ("task:\n  options: {x: " + "[" * 5000 + "]" * 5000 + "}\n", ["nested too deeply"]),
        ("? [1, 2]\n: 3\n", ["bomb.yaml", "unhashable"]),
    ],
)
def test_alias_bombs_and_deep_documents_are_refused(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    message = config_error(path)
    for name in names:
        assert name in message


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("rollout: &r {max_new_tokens: 7}\neval: {max_new_tokens: 7}\n")
    assert load_config(path).rollout.max_new_tokens == 7


def test_a_config_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run:\n  steps: 3\n  output_dir: caf\xe9\n")
    message = config_error(path)
    assert "latin1.yaml:3: not UTF-8 (byte 0xe9)" in message


def test_an_override_that_is_not_yaml_is_one_line() -> None:
    message = config_error(overrides=["optim.betas=[0.9,"])
    assert "optim.betas" in message and "not valid YAML" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "mapping" in config_error(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("optim: {lr: [1, 2\n")
    assert "broken.yaml" in config_error(path)


def test_override_through_a_value_is_rejected() -> None:
    message = config_error(overrides=["optim.lr=1e-4", "optim.lr.x=1"])
    assert "optim.lr" in message


# --- CLI -----------------------------------------------------------------------------


@pytest.fixture
def narrow_console(monkeypatch) -> None:
    """A non-terminal stderr of the default width, as when output goes to a log file."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def cli_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert lines[0].startswith("error:")
    return lines[0]


def test_cli_bad_value_exits_2_with_one_line(tmp_path: Path, capsys, narrow_console) -> None:
    path = write_yaml(tmp_path / "run.yaml", {"run": {"steps": 3}})
    line = cli_error(capsys, ["train", str(path), "optim.lr=-1"])
    assert "optim.lr" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override",
    ["optim.lrr=1", "objective.name=nosuchmethod", "model.student=" + "/no/such/dir" * 8],
)
def test_cli_long_errors_stay_on_one_line(
    tmp_path: Path, capsys, narrow_console, override: str
) -> None:
    path = write_yaml(tmp_path / "run.yaml", {"run": {"output_dir": str(tmp_path / "out")}})
    cli_error(capsys, ["train", str(path), override])


def test_cli_missing_config_file(tmp_path: Path, capsys, narrow_console) -> None:
    line = cli_error(capsys, ["train", str(tmp_path / "absent.yaml")])
    assert "absent.yaml" in line


def test_cli_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert tropd.__version__ in capsys.readouterr().out


def test_cli_lists_objectives(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    first_column = [line.split("│")[1].split() for line in out.splitlines() if "│" in line]
    names = {cell[0] for cell in first_column if cell}
    assert {"tropd", "opd"} <= names


# --- model checks before weights are loaded --------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny model directories with their weights removed: only configs can be read."""
    root = tmp_path_factory.mktemp("check_models")
    add = get_task("add").alphabet
    dirs = {
        "student": save_tiny_model(root / "student", 8, 1, seed=0, alphabet=add),
        "teacher": save_tiny_model(root / "teacher", 8, 1, seed=1, alphabet=add),
        "other_vocab": save_tiny_model(root / "other", 8, 1, seed=2, alphabet=add + "abc"),
    }
    for path in dirs.values():
        for weights in Path(path).glob("*.safetensors"):
            weights.unlink()
    return dirs


def model_config(models: dict[str, str], teacher: str, *overrides: str) -> Config:
    return load_config(
        None, [f"model.student={models['student']}", f"model.teacher={models[teacher]}", *overrides]
    )


def test_check_models_accepts_matching_vocabularies(models) -> None:
    loop.check_models(model_config(models, "teacher", "teacher.top_k=16"))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.max_new_tokens=300"], "rollout.max_new_tokens: 300"),
        (["rollout.max_new_tokens=8", "eval.max_new_tokens=256"], "eval.max_new_tokens: 256"),
    ],
)
def test_a_response_budget_beyond_the_models_positions_is_refused_from_configs(
    models, overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        loop.check_models(model_config(models, "teacher", "teacher.top_k=4", *overrides))
    message = one_line(info)
    assert message.startswith(key) and "256 positions" in message


def test_different_vocabularies_are_rejected(models) -> None:
    with pytest.raises(ConfigError) as info:
        loop.check_models(model_config(models, "other_vocab", "teacher.top_k=4"))
    message = str(info.value)
    assert message.startswith("model.teacher")
    assert "19" in message and "16" in message  # both vocabulary sizes
    assert "\n" not in message


def test_top_k_above_the_vocabulary_is_rejected(models) -> None:
    with pytest.raises(ConfigError) as info:
        loop.check_models(model_config(models, "teacher", "teacher.top_k=17"))
    message = str(info.value)
    assert message.startswith("teacher.top_k")
    assert "16" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("teacher", "top_k", "key"),
    [("other_vocab", 4, "model.teacher"), ("teacher", 64, "teacher.top_k")],
)
def test_build_stops_before_loading_weights(
    models, monkeypatch, tmp_path: Path, teacher: str, top_k: int, key: str
) -> None:
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the config checks")

    monkeypatch.setattr(loop, "load_model", no_weights)
    config = model_config(models, teacher, f"teacher.top_k={top_k}")
    with pytest.raises(ConfigError, match=rf"^{key}"):
        loop.build(config, tmp_path)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_unreadable_model_names_its_key(models, tmp_path: Path, role: str) -> None:
    names = {"student": models["student"], "teacher": models["teacher"]}
    names[role] = str(tmp_path / "no_such_model")
    config = load_config(None, [f"model.{key}={value}" for key, value in names.items()])
    with pytest.raises(ConfigError, match=rf"^model\.{role}") as info:
        loop.check_models(config)
    assert "no_such_model" in str(info.value)
