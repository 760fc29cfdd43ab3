"""The shipped built-in models: today's recipes, intact weights, used instead of a build;
`tropd models list/build`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, one_line

from tropd import cli
from tropd.model_names import load_model, load_tokenizer
from tropd.recipes import builtin, cache
from tropd.recipes.builtin import prepare_builtin
from tropd.recipes.mismatch import prepare_chain_model, student_recipe
from tropd.recipes.shipped import build_models, shipped_specs

SHIPPED = sorted(p.name for p in cache.SHIPPED_DIR.iterdir() if (p / "recipe.json").is_file())


@pytest.fixture
def no_build(monkeypatch):
    """Any SFT build fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was built although a shipped copy matches")

    monkeypatch.setattr(builtin, "sft_build", fail)
    monkeypatch.setattr("tropd.recipes.mismatch.sft_build", fail)


def test_every_model_is_shipped_with_todays_recipe():
    # A recipe change without `tropd models build` fails here, not silently on users.
    assert sorted(shipped_specs()) == SHIPPED
    for name, spec in shipped_specs().items():
        assert cache.verified(cache.SHIPPED_DIR / name, spec.key), name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_records_its_build(name):
    folder = cache.SHIPPED_DIR / name
    record = json.loads((folder / "recipe.json").read_text())
    assert (folder / "model.safetensors").stat().st_size < 5 * 10**6
    assert record["sha256"] == cache.file_sha256(folder / "model.safetensors")
    assert 0 <= record["eval_accuracy"] <= 1 and record["train_seconds"] > 0
    assert {"hidden_size", "num_layers", "steps", "lr", "seed"} <= set(record["recipe"])
    model = load_model(str(folder), dtype="float32", device="cpu")
    tokenizer = load_tokenizer(str(folder))
    assert model.config.hidden_size == record["recipe"]["hidden_size"]
    assert model.config.vocab_size == len(tokenizer)


def test_builtin_names_resolve_to_the_shipped_copy(tmp_path, monkeypatch, no_build):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path))
    assert prepare_builtin("add", "student") == cache.SHIPPED_DIR / "add-student"
    assert prepare_chain_model(student_recipe("strong")) == (
        cache.SHIPPED_DIR / "chain-student-strong"
    )
    model = load_model("builtin:add:teacher", dtype="float32", device="cpu")
    assert model.config.hidden_size == builtin.RECIPES["teacher"].hidden_size
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing cached


def test_damaged_shipped_weights_are_not_used(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    shutil.copytree(cache.SHIPPED_DIR / "add-student", shipped / "add-student")
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    key = shipped_specs()["add-student"].key
    assert cache.find_shipped(key) == shipped / "add-student"
    weights = shipped / "add-student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert cache.find_shipped(key) is None
    assert "sha256" in capsys.readouterr().err


def test_a_changed_recipe_builds_and_caches_instead(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.RECIPES, "student", TINY_RECIPE)
    path = prepare_builtin("add", "student", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name == shipped_specs()["add-student"].cache_name
    record = json.loads((path / "recipe.json").read_text())
    assert record["recipe"]["steps"] == TINY_RECIPE.steps
    assert cache.verified(path, record["key"])
    # the shipped copy of the real recipe stays as it was
    assert cache.verified(
        cache.SHIPPED_DIR / "add-student",
        json.loads((cache.SHIPPED_DIR / "add-student" / "recipe.json").read_text())["key"],
    )


def test_models_list_names_each_model_where_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path))
    assert cli.main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(shipped_specs())
    record = json.loads((cache.SHIPPED_DIR / "chain-teacher" / "recipe.json").read_text())
    teacher = rows["chain-teacher"]
    assert teacher["shipped"] and not teacher["cached"]
    assert teacher["key"] == record["key"] and teacher["accuracy"] == record["eval_accuracy"]
    assert (
        teacher["size_bytes"]
        == (cache.SHIPPED_DIR / "chain-teacher" / "model.safetensors").stat().st_size
    )
    assert cli.main(["models", "list"]) == 0
    assert "chain-student-multi" in capsys.readouterr().out


def test_models_build_builds_keeps_and_forces(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(builtin.RECIPES, "student", TINY_RECIPE)
    out = tmp_path / "out"
    assert cli.main(["models", "build", "add-student", "--out", str(out)]) == 0
    first = json.loads((out / "add-student" / "recipe.json").read_text())
    table = capsys.readouterr().out
    assert f"│ {first['eval_accuracy']:.3f}" in table and "│ built" in table
    assert first["key"] == shipped_specs()["add-student"].key
    assert [p.name for p in out.iterdir()] == ["add-student"]  # no temporary left behind

    def fail(*args):
        raise AssertionError("rebuilt a model built with today's recipe")

    real_build = builtin._build
    monkeypatch.setattr(builtin, "_build", fail)
    (row,) = build_models(["add-student"], out)
    assert not row["built"] and row["accuracy"] == first["eval_accuracy"]
    assert row["shipped_accuracy"] is None  # the shipped copy is of another recipe
    monkeypatch.setattr(builtin, "_build", real_build)
    (row,) = build_models(["add-student"], out, force=True)
    assert row["built"] and cache.verified(out / "add-student", first["key"])


def test_models_build_rejects_an_unknown_name(tmp_path, capsys):
    assert cli.main(["models", "build", "mul-teacher", "--out", str(tmp_path)]) == 2
    assert "unknown model 'mul-teacher'" in capsys.readouterr().err
    with pytest.raises(ValueError) as error:
        build_models(["mul-teacher"], tmp_path)
    assert "chain-teacher" in one_line(error)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_rebuild_reaches_the_recorded_accuracy(tmp_path):
    """Rebuilding `chain-student-none` (trained to convergence, about 100 s on one core)
    gives the recorded greedy accuracy up to the eval's binomial noise: 4 standard errors
    of a proportion over `eval_items` items. Bit-identity is not expected across
    machines."""
    (row,) = build_models(["chain-student-none"], tmp_path)
    recorded = json.loads((cache.SHIPPED_DIR / "chain-student-none" / "recipe.json").read_text())
    p, n = recorded["eval_accuracy"], recorded["eval_items"]
    assert row["built"] and row["shipped_accuracy"] == p
    assert abs(row["accuracy"] - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_the_wheel_carries_every_shipped_file(tmp_path):
    """`pip install .` (not editable) installs the shipped models: the wheel built from the
    sources holds every file of `shipped/`, byte for byte."""
    root = Path(__file__).parents[2]
    source = tmp_path / "source"
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, str(source), "-w", str(tmp_path / "dist")], check=True)
    (wheel,) = (tmp_path / "dist").glob("tropd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
        for path in sorted(cache.SHIPPED_DIR.glob("*/*")):
            inside = f"tropd/recipes/shipped/{path.parent.name}/{path.name}"
            assert inside in packed, inside
            assert archive.read(inside) == path.read_bytes(), inside
