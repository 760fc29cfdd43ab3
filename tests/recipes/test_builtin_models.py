"""The built-in models: built on first use, cached under a hash of the recipe, atomically."""

import dataclasses
import json

import pytest
import torch
from conftest import TINY_RECIPE

from tropd.model_names import load_model, load_tokenizer
from tropd.recipes import builtin
from tropd.recipes.builtin import prepare_builtin
from tropd.tasks.chat import prompt_ids


@pytest.fixture
def tiny_recipes(monkeypatch):
    monkeypatch.setitem(builtin.RECIPES, "student", TINY_RECIPE)
    monkeypatch.setitem(builtin.RECIPES, "teacher", TINY_RECIPE)


def test_prepare_builtin_writes_a_complete_cached_directory(tmp_path, tiny_recipes, monkeypatch):
    path = prepare_builtin("add", "student", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("add-student-")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= {
        p.name for p in path.iterdir()
    }
    record = json.loads((path / "recipe.json").read_text())
    assert record["recipe"]["steps"] == TINY_RECIPE.steps
    assert record["task_options"] == {"digits": 3}
    assert 0.0 <= record["eval_accuracy"] <= 1.0 and record["train_seconds"] >= 0
    model = load_model(str(path), dtype="float32", device="cpu")
    assert model.config.hidden_size == TINY_RECIPE.hidden_size
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.decode(prompt_ids(tokenizer, "1+2=")) == "1+2="

    def no_build(*args):
        raise AssertionError("a cached model was rebuilt")

    monkeypatch.setattr(builtin, "_build", no_build)
    assert prepare_builtin("add", "student", cache_dir=tmp_path) == path


def test_prepare_builtin_is_reproducible_and_keyed_by_recipe(tmp_path, tiny_recipes, monkeypatch):
    first = prepare_builtin("add", "student", cache_dir=tmp_path / "a")
    again = prepare_builtin("add", "student", cache_dir=tmp_path / "b")
    assert first.name == again.name
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    longer = dataclasses.replace(TINY_RECIPE, steps=TINY_RECIPE.steps + 1)
    monkeypatch.setitem(builtin.RECIPES, "student", longer)
    assert prepare_builtin("add", "student", cache_dir=tmp_path / "a").name != first.name


def test_failed_build_leaves_no_directory(tmp_path, tiny_recipes, monkeypatch):
    def broken_build(task, role, recipe, out_dir, console):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(builtin, "_build", broken_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        prepare_builtin("copy", "teacher", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_build_that_finished_first_wins(tmp_path, tiny_recipes, monkeypatch):
    real_build = builtin._build

    def build_then_lose_the_race(task, role, recipe, out_dir, console):
        real_build(task, role, recipe, out_dir, console)
        winner = tmp_path / out_dir.name.split(".")[1]
        winner.mkdir()
        (winner / "recipe.json").write_text('{"winner": true}')

    monkeypatch.setattr(builtin, "_build", build_then_lose_the_race)
    path = prepare_builtin("add", "teacher", cache_dir=tmp_path)
    assert json.loads((path / "recipe.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_load_model_builds_a_builtin_on_first_use(tmp_path, tiny_recipes, monkeypatch):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    model = load_model("builtin:reverse:student", dtype="float32", device="cpu")
    # Building on first use leaves the caller's random stream where it was.
    torch.testing.assert_close(torch.rand(3), expected_draw)
    tokenizer = load_tokenizer("builtin:reverse:student")
    assert model.config.vocab_size == len(tokenizer)
    assert [p.name.split("-")[:2] for p in tmp_path.iterdir()] == [["reverse", "student"]]


def test_prepare_builtin_rejects_unknown_role(tmp_path):
    with pytest.raises(ValueError, match="teacher, student"):
        prepare_builtin("add", "coach", cache_dir=tmp_path)
