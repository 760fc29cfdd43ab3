"""Test helper: `tropd.train` with rollouts that do not depend on how prompts are split.

Each prompt's rollouts are sampled on their own, seeded by (step, prompt), so a step's
global batch is the same for any number of processes and the losses and weights of runs
with different world sizes can be compared. Run under torchrun as
`python -m torch.distributed.run ... dist_harness.py CONFIG [--resume] [--die-at STEP]
[--term-at STEP]` (`--die-at`: every rank SIGKILLs itself when that step starts;
`--term-at`: rank 1 alone sends itself SIGTERM when that step starts, and a run stopped by
it exits with `tropd train`'s code 75).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import zlib

import torch

from tropd.batch import TokenBatch
from tropd.cli import EXIT_STOPPED
from tropd.config import load_config
from tropd.train import distributed, loop
from tropd.train.shutdown import RunStopped


def concat(parts: list[TokenBatch], samples_per_prompt: int) -> TokenBatch:
    """Stack one-prompt batches, right-padding every `[1*, T]` field to the widest."""
    width = max(p.tokens.shape[1] for p in parts)
    fields = {}
    for name in ("tokens", "origin", "attention_mask", "sampler_logprobs"):
        fields[name] = torch.cat(
            [
                torch.nn.functional.pad(getattr(p, name), (0, width - p.tokens.shape[1]))
                for p in parts
            ]
        )
    fields["group"] = torch.arange(len(parts)).repeat_interleave(samples_per_prompt)
    return TokenBatch(**fields)


def per_prompt_rollout(real_rollout):
    def rollout(setup, prompts, step, rank=0, world_size=1):
        parts, cap = [], 0.0
        for prompt in prompts:
            torch.manual_seed(zlib.crc32(repr((step, prompt)).encode()))
            batch, cap = real_rollout(setup, [prompt], step)
            parts.append(batch)
        return concat(parts, setup.config.rollout.samples_per_prompt), cap

    return rollout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-at", type=int, default=0)
    parser.add_argument("--term-at", type=int, default=0)
    args = parser.parse_args()
    config = load_config(args.config)
    loop.rollout = per_prompt_rollout(loop.rollout)
    real_step = loop.train_step

    def train_step(setup, step, rank, world_size):
        if step == args.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.term_at and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(setup, step, rank, world_size)

    loop.train_step = train_step
    try:
        with distributed.process_group(config) as (rank, world_size):
            loop.train(config, args.resume, rank, world_size)
    except RunStopped:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    main()
