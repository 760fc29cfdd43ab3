"""Fuzzing `tropd train` with bad configs and data files: every generated case ends in a
one-line error (exit 1 or 2) or a clean run, never a traceback or a hang.

The cases come from a seeded generator of mutations of a small valid run (wrong types,
booleans, huge and non-finite numbers, unknown and duplicate keys, YAML anchors, bad
UTF-8, malformed JSONL/CSV/JSON rows, directories as files, bad task options, devices,
output folders). They run in forked children of one helper process (`fuzz_harness.py`).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

CASES = 240
SEED = 20260
TIMEOUT_S = 60  # per case: far above a clean run's few seconds, so only a hang reaches it

NUMBERS = [
    "run.steps",
    "run.seed",
    "run.save_every",
    "run.keep_checkpoints",
    "run.log_samples",
    "rollout.prompts_per_step",
    "rollout.samples_per_prompt",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "rollout.top_p",
    "guidance.temperature",
    "guidance.initial_cap",
    "guidance.guided_fraction",
    "teacher.top_k",
    "teacher.chunk_size",
    "teacher.timeout_s",
    "optim.lr",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.grad_clip",
    "optim.micro_batch_size",
    "optim.head_chunk",
    "optim.max_skipped_steps_in_row",
    "eval.every",
    "eval.num_prompts",
    "eval.temperature",
    "eval.samples",
    "eval.max_new_tokens",
    "lora.rank",
    "lora.alpha",
    "lora.dropout",
    "distributed.timeout_s",
    "objective.options.beta",
    "task.options.digits",
]
TEXTS = ["model.dtype", "model.device", "objective.name", "task.name", "run.output_dir"]
WRONG = ["abc", [1, 2], {"a": 1}, None, "", True, False, "1e-4x", [], {}]
HUGE = [10**12, 10**30, -(10**30), 2**63, 1e308, -1, 0, -1e-300]
NON_FINITE = [".inf", "-.inf", ".nan", "1e400", "-1e400", ".NaN"]
RECORDS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]


def base_config(pair: tuple[str, str]) -> dict:
    teacher, student = pair
    return {
        "run": {"steps": 1, "progress": False, "output_dir": "run", "save_every": 0},
        "model": {"student": student, "teacher": teacher},
        "task": {"name": "add", "options": {"digits": 1}},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4},
        "teacher": {"top_k": 4},
        "objective": {"name": "opd"},
        "eval": {"every": 0, "num_prompts": 4},
        "optim": {"micro_batch_size": 4},
    }


def set_key(config: dict, key: str, value) -> None:
    *sections, last = key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = value


def jsonl_task(config: dict, path: str, rng: random.Random) -> None:
    config["task"] = {
        "name": f"jsonl:{path}",
        "options": {"eval_fraction": 0.5, "skip_bad_rows": rng.random() < 0.5},
    }


def bad_jsonl(rng: random.Random) -> bytes:
    lines = [json.dumps(r).encode() for r in RECORDS[:12]]
    for _ in range(rng.randint(1, 3)):
        bad = rng.choice(
            [
                b"{oops",
                b"[1, 2]",
                b'"text"',
                b'{"answer": "3"}',
                b'{"prompt": ["a"], "answer": "1"}',
                b'{"prompt": "\xff\xfe=", "answer": "1"}',
                b'{"prompt": "1+1=", "answer": "\xc3"}',
                b"[" * 100_000 + b"]" * 100_000,
                b'{"prompt": "' + b"9" * 300_000 + b'", "answer": "1"}',
                b'{"messages": [{"role": "wizard", "content": "x"}]}',
                b'{"messages": "not json"}',
                b"\x00\x01\x02",
                b"",
            ]
        )
        lines.insert(rng.randint(0, len(lines)), bad)
    if rng.random() < 0.1:
        lines = []
    return b"\n".join(lines) + b"\n"


def bad_csv(rng: random.Random) -> bytes:
    lines = [b"prompt,answer"] + [f"{r['prompt']},{r['answer']}".encode() for r in RECORDS[:12]]
    for _ in range(rng.randint(1, 3)):
        bad = rng.choice(
            [
                b"1+1=,2,extra",
                b"1+1=",
                b"\xff+1=,2",
                b'"' + b"x" * 200_000 + b'",1',
                b'"' + b"x" * (70 * 2**20 // 1024) + b'",1',
                b'"unclosed,1',
                b",",
                b"\x00,1",
            ]
        )
        lines.insert(rng.randint(1, len(lines)), bad)
    if rng.random() < 0.1:
        lines = lines[:1]
    if rng.random() < 0.1:
        lines[0] = b"pr\xffompt,answer"
    return b"\n".join(lines) + b"\n"


def alias_text(rng: random.Random) -> str:
    kind = rng.choice(["bomb", "recursive", "fine", "merge"])
    if kind == "bomb":
        depth, width = rng.randint(5, 9), rng.randint(8, 12)
        lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        return "task:\n  options:\n" + "".join(f"    {line}\n" for line in lines)
    if kind == "recursive":
        return "task:\n  options: &o {x: [*o]}\n"
    if kind == "merge":
        return "rollout: &r {max_new_tokens: 4}\neval:\n  <<: *r\n"
    return "rollout: &r {max_new_tokens: 4}\neval: {max_new_tokens: 4, every: 0}\n"


def make_case(rng: random.Random, pair: tuple[str, str], folder: Path) -> tuple[str, list[str]]:
    """Write one case's files into `folder`; returns its kind and the `tropd` argv."""
    config, overrides, text = base_config(pair), [], None
    kind = rng.choice(
        [
            "wrong_type",
            "huge",
            "non_finite",
            "unknown_key",
            "duplicate_key",
            "aliases",
            "bad_utf8_config",
            "yaml_garbage",
            "jsonl",
            "csv",
            "json",
            "directory",
            "task_options",
            "device",
            "output_dir",
            "overrides",
            "long_prompt",
            "clean",
        ]
    )
    if kind == "wrong_type":
        key = rng.choice(NUMBERS + TEXTS)
        set_key(config, key, rng.choice(WRONG))
    elif kind == "huge":
        set_key(config, rng.choice(NUMBERS), rng.choice(HUGE))
    elif kind == "non_finite":
        overrides.append(f"{rng.choice(NUMBERS)}={rng.choice(NON_FINITE)}")
    elif kind == "unknown_key":
        section = rng.choice([*config, "nosuch"])
        set_key(config, f"{section}.{rng.choice(['colour', 'lr', 'stepz', '1'])}", 1)
    elif kind == "duplicate_key":
        text = yaml.safe_dump(config) + rng.choice(["run:\n  steps: 2\n", "task: {name: add}\n"])
        text = text.replace("  steps: 1\n", "  steps: 1\n  steps: 3\n", rng.random() < 0.5)
    elif kind == "aliases":
        text = yaml.safe_dump(config) + alias_text(rng)
    elif kind == "bad_utf8_config":
        raw = yaml.safe_dump(config).encode()
        at = rng.randint(0, len(raw))
        (folder / "config.yaml").write_bytes(
            raw[:at] + rng.choice([b"\xff", b"\xc3", b"\x80"]) + raw[at:]
        )
    elif kind == "yaml_garbage":
        raw = yaml.safe_dump(config)
        at = rng.randint(0, len(raw))
        text = (
            raw[:at]
            + rng.choice(["{", "[", ":", "&", "*", "!", "%", "@", "\t", "- ", "'"])
            + raw[at:]
        )
    elif kind in ("jsonl", "csv", "json"):
        data = folder / f"data.{kind}"
        if kind == "jsonl":
            data.write_bytes(bad_jsonl(rng))
        elif kind == "csv":
            data.write_bytes(bad_csv(rng))
        else:
            data.write_bytes(
                rng.choice([b"{}", b"[1, 2", json.dumps(RECORDS).encode() + b"\xff", b"[]"])
            )
        jsonl_task(config, str(data), rng)
        config["task"]["name"] = f"{kind}:{data}"
    elif kind == "directory":
        (folder / "data").mkdir()
        jsonl_task(config, str(folder / "data"), rng)
        config["task"]["name"] = (
            f"{rng.choice(['jsonl', 'csv', 'json', 'parquet'])}:{folder / 'data'}"
        )
    elif kind == "task_options":
        options = rng.choice(
            [
                {"digits": "abc"},
                {"digits": 10**9},
                {"colour": 1},
                {"digits": [3]},
                {"path": "x.jsonl"},
            ]
        )
        config["task"] = {
            "name": rng.choice(["add", "copy", "reverse", "chain"]),
            "options": options,
        }
        if rng.random() < 0.5:
            data = folder / "data.jsonl"
            data.write_bytes(bad_jsonl(rng))
            config["task"] = {
                "name": f"jsonl:{data}",
                "options": rng.choice(
                    [
                        {"colour": 1},
                        {"verifier": "fuzzy"},
                        {"fields": {"q": "x"}},
                        {"eval_fraction": 2},
                        {"fields": "prompt"},
                        {"timeout_s": 1e308},
                        {"path": str(data)},
                        {"format": "xml"},
                    ]
                ),
            }
    elif kind == "device":
        config["model"]["device"] = rng.choice(["meta", "mps", "cuda:7", "xla", "cpu:0", "", "gpu"])
    elif kind == "output_dir":
        (folder / "file").write_text("")
        config["run"]["output_dir"] = rng.choice(["file/run", "x" * 300, "file", "/proc/run"])
    elif kind == "overrides":
        overrides.append(
            rng.choice(
                [
                    "optim.lr",
                    "=3",
                    "a.b.c.d=1",
                    "run=3",
                    "optim.lr.x=1",
                    "optim.betas=[0.9,",
                    "task.options=&a [*a]",
                    "run.steps=!!python/object:os.system",
                    "eval.every={",
                ]
            )
        )
    elif kind == "long_prompt":
        config["task"]["options"]["digits"] = rng.choice([200, 1000])
        config["task"]["truncate_prompts"] = rng.choice(["error", "left"])
    if text is not None:
        (folder / "config.yaml").write_text(text)
    elif not (folder / "config.yaml").exists():
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return kind, ["train", "config.yaml", *overrides]


@pytest.mark.slow
def test_bad_configs_and_data_end_in_one_line_or_a_clean_run(tiny_pair, tmp_path):
    rng = random.Random(SEED)
    kinds, cases = [], []
    for index in range(CASES):
        folder = tmp_path / f"case{index:03d}"
        folder.mkdir()
        kind, argv = make_case(rng, tiny_pair, folder)
        kinds.append(kind)
        cases.append({"dir": str(folder), "argv": argv})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    harness = Path(__file__).with_name("fuzz_harness.py")
    subprocess.run(
        [
            sys.executable,
            str(harness),
            str(tmp_path / "cases.json"),
            str(tmp_path / "out.json"),
            str(TIMEOUT_S),
        ],
        check=True,
        timeout=CASES * TIMEOUT_S,
    )
    results = json.loads((tmp_path / "out.json").read_text())
    outcomes = Counter()
    for kind, case, result in zip(kinds, cases, results, strict=True):
        code, lines = result["code"], [x for x in result["stderr"].splitlines() if x.strip()]
        context = f"{kind} {case['argv']} in {case['dir']}: code {code}, stderr {lines[-6:]}"
        assert code in (0, 1, 2), context
        assert "Traceback" not in result["stderr"], context
        errors = [line for line in lines if line.startswith("error:")]
        if code:
            assert len(errors) == 1 and lines[-1] == errors[0], context
            assert all(x.startswith(("error:", "warning:")) for x in lines), context
        else:
            assert not errors and any(line.startswith("done:") for line in lines), context
        outcomes["clean" if code == 0 else "error"] += 1
    # Both outcomes are exercised, and some errors come from the data files themselves.
    assert outcomes["clean"] >= 5 and outcomes["error"] >= CASES // 2, outcomes
    data_errors = sum(
        1 for k, r in zip(kinds, results, strict=True) if k in ("jsonl", "csv") and r["code"]
    )
    assert data_errors >= 10, data_errors
