"""The SFT recipe: batches, training, and the eval-split scores of a built model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd.models import tiny_llama_config
from tropd.recipes.sft import (
    IGNORE_INDEX,
    _sft_batch,
    eval_split_scores,
    response_nll,
    sft_train,
)
from tropd.tasks import Item
from tropd.tasks.builtin import get_task
from tropd.tasks.tokenizer import build_char_tokenizer


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


def test_eval_split_scores_decode_after_the_padded_prompt_and_verify(add_task, tokenizer):
    items = add_task.items("eval", 50, seed=4)
    expected = sum(int(item.prompt.split("+")[0]) % 2 == 0 for item in items) / len(items)
    assert 0.0 < expected < 1.0
    model = ScriptedModel(tokenizer, add_task)
    scores = eval_split_scores(model, tokenizer, add_task, n=50, seed=4, batch_size=16)
    assert scores == {"accuracy": pytest.approx(expected), "eos_fraction": 1.0}
    default_batches = eval_split_scores(model, tokenizer, add_task, n=50, seed=4)
    assert default_batches["accuracy"] == pytest.approx(expected)
    no_eos = ScriptedModel(tokenizer, add_task, end_with_eos=False)
    assert eval_split_scores(no_eos, tokenizer, add_task, n=50, seed=4)["eos_fraction"] == 0.0
