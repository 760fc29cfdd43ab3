"""Turning an `Item` into the prompt tokens a model sees, through its chat template."""

from __future__ import annotations

from tropd.tasks.task import Item


def item_messages(item: Item, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat of `item`: its own `messages`, or one user turn holding `item.prompt`.

    A system message comes first when the chat has none: the item's `system`, else
    `system_prompt` (the run's `task.system_prompt`), else nothing.
    """
    messages = [dict(m) for m in item.messages] if item.messages else []
    if not messages:
        messages = [{"role": "user", "content": item.prompt}]
    system = item.system or system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def encode_prompt(tokenizer, item: Item, system_prompt: str | None = None) -> list[int]:
    """Token ids of `item`'s prompt ready for generation.

    With a chat template: the template applied to `item_messages` with the generation
    prompt added. Without one: the message texts joined by blank lines. For a built-in
    task without a system prompt this equals `prompt_ids`.
    """
    messages = item_messages(item, system_prompt)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user prompt as the model sees it: the chat template if any, else raw."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
    else:
        text = prompt
    return tokenizer.encode(text, add_special_tokens=False)
