"""tropd's training step on a CUDA GPU, float32 against `model.autocast: bf16`.

For `bench/throughput.py`'s random-weight shapes (no download), each objective runs
a few steps with `model.device=cuda` in each precision; the script prints the median step
and its phases, and the peak GPU memory (the losses of the two differ by their rollouts too:
bf16 samples other tokens; tests/train/test_autocast.py compares them on a fixed batch, on a
GPU too). Run on a machine with a CUDA GPU:

    python bench/gpu_check.py [--shapes anchor,vocab152k] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import throughput as tp
import torch

from tropd.train import loop

PHASES = ("time_generate_s", "time_teacher_s", "time_train_s", "time_optimizer_s")


def run(shape, models: Path, objective: str, precision: str, steps: int) -> dict:
    """`steps` train steps from the same seed; the first is a warm-up (not timed)."""
    config = tp.tropd_config(shape, models, objective, precision, "cuda", [])
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        setup = loop.build(config, Path(run_dir))
        setup.train_prompts = [list(p) for p in tp.make_prompts(shape, models)]
        records = []
        for i in range(steps):
            loop.seed_everything(tp.SEED, tp.TROPD_FIRST_STEP + i, 0)
            torch.cuda.synchronize()
            tic = time.perf_counter()
            record = loop.train_step(setup, tp.TROPD_FIRST_STEP + i, rank=0, world_size=1)
            torch.cuda.synchronize()
            record["wall_s"] = time.perf_counter() - tic
            records.append(record)
    timed = records[1:]
    return {
        "shape": shape.name,
        "objective": objective,
        "precision": precision,
        "first_loss": records[0]["loss"],
        "step_s": statistics.median(r["wall_s"] for r in timed),
        **{p: statistics.median(r[p] for r in timed) for p in PHASES},
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="anchor,vocab152k")
    parser.add_argument("--objectives", default="opd,tropd")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="a JSON file for the results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark runs on a GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    results = []
    for name in args.shapes.split(","):
        shape = tp.SHAPES[name]
        models = tp.ensure_models(shape, tp.DEFAULT_CACHE)
        for objective in args.objectives.split(","):
            pair = [run(shape, models, objective, p, args.steps) for p in ("none", "bf16")]
            for r in pair:
                r["bf16_speedup"] = pair[0]["step_s"] / pair[1]["step_s"]
                results.append(r)
                print(
                    json.dumps(
                        {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                    )
                )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
