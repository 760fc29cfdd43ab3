import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd.models import load_model, load_tokenizer, tiny_llama_config
from tropd.tasks import Item, recipes
from tropd.tasks.builtin import get_task
from tropd.tasks.recipes import (
    IGNORE_INDEX,
    BuiltinRecipe,
    _sft_batch,
    accuracy,
    evaluate,
    prepare_builtin,
    prompt_ids,
    response_nll,
    sft_train,
)
from tropd.tasks.tokenizer import build_char_tokenizer

TINY_RECIPE = BuiltinRecipe(
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    steps=3,
    batch_size=4,
    lr=1e-3,
    warmup_steps=1,
    eval_items=8,
)


@pytest.fixture
def add_task():
    return get_task("add", digits=2)


@pytest.fixture
def tokenizer(add_task):
    return build_char_tokenizer(add_task.alphabet)


def _tiny_model(tokenizer, hidden=32, seed=0):
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden, num_layers=1, num_heads=2)
    return AutoModelForCausalLM.from_config(config)


def test_sft_batch_trains_only_the_response_and_eos(add_task, tokenizer):
    items = [Item(prompt="7+8=", answer="15"), Item(prompt="12+30=", answer="42")]
    input_ids, attention_mask, labels = _sft_batch(tokenizer, add_task, items, torch.device("cpu"))
    encode = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    short = [*map(encode, "7+8=15"), eos]
    long = [*map(encode, "12+30=42"), eos]
    assert input_ids.tolist() == [[*short, pad, pad], long]  # right-padded
    assert attention_mask.tolist() == [[1] * 7 + [0, 0], [1] * 9]
    ignore = IGNORE_INDEX
    assert labels.tolist() == [
        [ignore] * 4 + [encode("1"), encode("5"), eos, ignore, ignore],
        [ignore] * 6 + [encode("4"), encode("2"), eos],
    ]


def test_sft_train_reduces_held_out_response_nll(add_task, tokenizer):
    model = _tiny_model(tokenizer)
    held_out = add_task.items("eval", 64, seed=1)
    before = response_nll(model, tokenizer, add_task, held_out)
    sft_train(model, tokenizer, add_task, steps=40, batch_size=16, lr=3e-3, seed=0)
    after = response_nll(model, tokenizer, add_task, held_out)
    assert before > 2.0  # about log(vocab size) for a random model
    assert after < before - 0.5


def test_sft_train_is_reproducible_and_keeps_the_mode(add_task, tokenizer):
    first, second = _tiny_model(tokenizer), _tiny_model(tokenizer)
    first.eval()
    for model in (first, second):
        sft_train(
            model, tokenizer, add_task, steps=5, batch_size=4, lr=1e-3, seed=3, schedule="constant"
        )
    assert not first.training
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="cosine or constant"):
        sft_train(
            first, tokenizer, add_task, steps=1, batch_size=1, lr=1e-3, seed=0, schedule="linear"
        )


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` writes the gold answer, or a wrong one
    for prompts whose first operand is odd, then EOS, after the left-padded prompt."""

    def __init__(self, tokenizer, task, end_with_eos=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.task, self.end_with_eos = tokenizer, task, end_with_eos

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            left, right = prompt[:-1].split("+")
            answer = int(left) + int(right) + (int(left) % 2)
            new = self.tokenizer.encode(str(answer), add_special_tokens=False)
            if self.end_with_eos:
                new.append(self.tokenizer.eos_token_id)
            assert len(new) <= max_new_tokens
            rows.append(ids.tolist() + new)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def test_evaluate_decodes_after_the_padded_prompt_and_verifies(add_task, tokenizer):
    items = add_task.items("eval", 50, seed=4)
    expected = sum(int(item.prompt.split("+")[0]) % 2 == 0 for item in items) / len(items)
    assert 0.0 < expected < 1.0
    model = ScriptedModel(tokenizer, add_task)
    scores = evaluate(model, tokenizer, add_task, n=50, seed=4, batch_size=16)
    assert scores == {"accuracy": pytest.approx(expected), "eos_fraction": 1.0}
    assert accuracy(model, tokenizer, add_task, n=50, seed=4) == pytest.approx(expected)
    no_eos = ScriptedModel(tokenizer, add_task, end_with_eos=False)
    assert evaluate(no_eos, tokenizer, add_task, n=50, seed=4)["eos_fraction"] == 0.0


def test_prompt_ids_are_the_prompt_characters(tokenizer):
    assert tokenizer.decode(prompt_ids(tokenizer, "12+34=")) == "12+34="


@pytest.fixture
def tiny_recipes(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "student", TINY_RECIPE)
    monkeypatch.setitem(recipes.RECIPES, "teacher", TINY_RECIPE)


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

    monkeypatch.setattr(recipes, "_build", no_build)
    assert prepare_builtin("add", "student", cache_dir=tmp_path) == path


def test_prepare_builtin_is_reproducible_and_keyed_by_recipe(tmp_path, tiny_recipes, monkeypatch):
    first = prepare_builtin("add", "student", cache_dir=tmp_path / "a")
    again = prepare_builtin("add", "student", cache_dir=tmp_path / "b")
    assert first.name == again.name
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    longer = dataclasses.replace(TINY_RECIPE, steps=TINY_RECIPE.steps + 1)
    monkeypatch.setitem(recipes.RECIPES, "student", longer)
    assert prepare_builtin("add", "student", cache_dir=tmp_path / "a").name != first.name


def test_failed_build_leaves_no_directory(tmp_path, tiny_recipes, monkeypatch):
    def broken_build(task, role, recipe, out_dir, console):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(recipes, "_build", broken_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        prepare_builtin("copy", "teacher", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_build_that_finished_first_wins(tmp_path, tiny_recipes, monkeypatch):
    real_build = recipes._build

    def build_then_lose_the_race(task, role, recipe, out_dir, console):
        real_build(task, role, recipe, out_dir, console)
        winner = tmp_path / out_dir.name.split(".")[1]
        winner.mkdir()
        (winner / "recipe.json").write_text('{"winner": true}')

    monkeypatch.setattr(recipes, "_build", build_then_lose_the_race)
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
