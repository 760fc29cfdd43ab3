"""Prompt encoding through a tokenizer's chat template."""

from tropd.tasks.builtin import get_task
from tropd.tasks.chat import prompt_ids
from tropd.tasks.tokenizer import build_char_tokenizer


def test_prompt_ids_are_the_prompt_characters():
    tokenizer = build_char_tokenizer(get_task("add", digits=2).alphabet)
    assert tokenizer.decode(prompt_ids(tokenizer, "12+34=")) == "12+34="
