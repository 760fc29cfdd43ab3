"""Supervised fine-tuning: the recipe that builds every built-in teacher and student.

A built-in model is a tiny Llama over the task's characters, trained with next-token NLL
on prompt + gold response + EOS (loss on the response only), then scored greedily on the
task's eval split (`eval_split_scores`). `sft_build` does all of it for one recipe and
saves the model; `tropd.recipes.builtin` and `tropd.recipes.mismatch` choose the recipes
and cache the results.
"""

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from tropd.console import StepProgress
from tropd.models import tiny_llama_config
from tropd.tasks import Item, SFTTask
from tropd.tasks.chat import prompt_ids
from tropd.tasks.tokenizer import build_char_tokenizer

IGNORE_INDEX = -100  # label value the HF loss skips


class SFTRecipe(Protocol):
    """What `sft_build` reads of a recipe (`BuiltinRecipe`, `ChainRecipe`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int
    eval_items: int


def _sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    task: SFTTask,
    items: list[Item],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels`, each `[B, T]`.

    Labels are the response tokens (gold response + EOS) and `IGNORE_INDEX` on the
    prompt and padding. Right padding keeps positions starting at 0, which is what
    `generate` reproduces from the attention mask of a left-padded batch.
    """
    sequences, label_rows = [], []
    for item in items:
        prompt = prompt_ids(tokenizer, item.prompt)
        response = tokenizer.encode(task.gold_response(item), add_special_tokens=False)
        response.append(tokenizer.eos_token_id)
        sequences.append(prompt + response)
        label_rows.append([IGNORE_INDEX] * len(prompt) + response)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(items), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, label_row) in enumerate(zip(sequences, label_rows, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        labels[row, : len(sequence)] = torch.tensor(label_row)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def sft_train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: SFTTask,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    on_step: Callable[[int, float], None] | None = None,
) -> PreTrainedModel:
    """Fine-tune `model` in place on gold responses of `task`'s train split.

    Loss: mean NLL over response tokens (gold response + EOS). AdamW, gradient norm
    clipped at 1; the learning rate warms up linearly over `warmup_steps`, then is
    `"constant"` or decays to 0 on a `"cosine"`. Batches are `steps * batch_size`
    items drawn from `task.items("train", ..., seed)`. `on_step(step, loss)` is
    called after every optimizer step (1-based). Returns `model`, in the train/eval
    mode it came in.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr schedule {schedule!r}; use cosine or constant")
    device = next(model.parameters()).device
    items = task.items("train", steps * batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    was_training = model.training
    model.train()
    for step in range(steps):
        batch = items[step * batch_size : (step + 1) * batch_size]
        input_ids, attention_mask, labels = _sft_batch(tokenizer, task, batch, device)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.train(was_training)
    return model


@torch.no_grad()
def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: SFTTask,
    items: list[Item],
    batch_size: int = 64,
) -> float:
    """Mean NLL (nats per token) of the gold responses + EOS of `items` under `model`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        input_ids, attention_mask, labels = _sft_batch(tokenizer, task, batch, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2),
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += nll.item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


@torch.no_grad()
def eval_split_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: SFTTask,
    n: int,
    seed: int,
    greedy: bool = True,
    batch_size: int = 128,
) -> dict[str, float]:
    """Generate for `n` eval-split items and verify: `accuracy` and `eos_fraction`.

    Prompts are left-padded in batches; generation stops at EOS or after the
    longest gold response + 4 tokens. `eos_fraction` is the share of responses
    that ended with EOS (well-formed). Sampling (`greedy=False`) is seeded by
    `seed` without disturbing the caller's torch RNG.
    """
    device = next(model.parameters()).device
    items = task.items("eval", n, seed)
    longest = max(
        len(tokenizer.encode(task.gold_response(i), add_special_tokens=False)) for i in items
    )
    correct, ended = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            prompts = [prompt_ids(tokenizer, item.prompt) for item in batch]
            encoded = tokenizer.pad(
                {"input_ids": prompts},
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=longest + 4,
                do_sample=not greedy,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for item, response in zip(
                batch, output[:, encoded["input_ids"].shape[1] :], strict=True
            ):
                ended += int((response == tokenizer.eos_token_id).any())
                text = tokenizer.decode(response, skip_special_tokens=True)
                correct += task.score(text, item)
    model.train(was_training)
    return {"accuracy": correct / len(items), "eos_fraction": ended / len(items)}


def sft_build(
    task: SFTTask, recipe: SFTRecipe, label: str, out_dir: Path, console: Console
) -> dict[str, float]:
    """SFT a fresh tiny Llama shaped by `recipe` on `task`'s gold responses, evaluate it
    greedily, and save model and tokenizer into `out_dir`. Returns the measured numbers
    for `recipe.json`."""
    tokenizer = build_char_tokenizer(task.alphabet)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # A private RNG stream: building on first use must not shift the caller's seeds,
    # or a run would differ depending on whether the model was already cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config)
    started, started_cpu = time.perf_counter(), time.process_time()
    with StepProgress(f"{label} SFT", recipe.steps, console=console) as progress:
        sft_train(
            model,
            tokenizer,
            task,
            steps=recipe.steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            seed=recipe.seed,
            warmup_steps=recipe.warmup_steps,
            on_step=lambda step, loss: progress.update(step, f"loss {loss:.4f}"),
        )
    train_seconds = time.perf_counter() - started
    train_cpu_seconds = time.process_time() - started_cpu
    scores = eval_split_scores(model, tokenizer, task, recipe.eval_items, seed=recipe.seed)
    console.log(
        f"{label}: eval accuracy {scores['accuracy']:.3f} (greedy, {recipe.eval_items} items), "
        f"ended with EOS {scores['eos_fraction']:.3f}, trained in {train_seconds:.1f}s"
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "eval_accuracy": scores["accuracy"],
        "eval_eos_fraction": scores["eos_fraction"],
        "eval_items": recipe.eval_items,
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "torch_threads": torch.get_num_threads(),
    }
