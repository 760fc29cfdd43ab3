"""Prompt sources: each format on small fixture files, field mapping, splits, bad rows."""

from __future__ import annotations

import csv
import json

import pytest

from tropd.tasks import get_task
from tropd.tasks.chat import encode_prompt, item_messages
from tropd.tasks.sources import SourceError
from tropd.tasks.tokenizer import build_char_tokenizer

RECORDS = [{"question": f"{a}+{a}=", "solution": str(2 * a)} for a in range(40)]
FIELDS = {"prompt": "question", "answer": "solution"}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def all_items(task):
    return task.pools["train"] + task.pools["eval"]


def test_jsonl_csv_parquet_and_json_give_the_same_items(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    csv_file = write_csv(tmp_path / "d.csv", RECORDS)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), parquet)
    json_file = tmp_path / "d.json"
    json_file.write_text(json.dumps(RECORDS))
    tasks = [
        get_task(f"jsonl:{jsonl}", fields=FIELDS),
        get_task(f"csv:{csv_file}", fields=FIELDS),
        get_task(f"parquet:{parquet}", fields=FIELDS),
        get_task("file", path=str(json_file), fields=FIELDS),
    ]
    expected = sorted((r["question"], r["solution"]) for r in RECORDS)
    for task in tasks:
        assert sorted((i.prompt, i.answer) for i in all_items(task)) == expected
        item = task.pools["train"][0]
        assert task.score(f" {item.answer} ", item) == 1.0
        assert task.score("nope", item) == 0.0


def test_hf_dataset_saved_to_disk_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS[:30]),
            "test": datasets.Dataset.from_list(RECORDS[30:]),
        }
    )
    data.save_to_disk(tmp_path / "ds")
    task = get_task(f"hf:{tmp_path / 'ds'}", fields=FIELDS, eval_split="test")
    assert len(task.pools["train"]) == 30
    assert [i.prompt for i in task.pools["eval"]] == [r["question"] for r in RECORDS[30:]]
    with pytest.raises(ValueError, match="no split 'validation'"):
        get_task(f"hf:{tmp_path / 'ds'}", fields=FIELDS, eval_split="validation")


def test_hash_split_is_disjoint_stable_and_shuffled_by_seed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    task = get_task("file", path=str(path), fields=FIELDS, eval_fraction=0.25)
    train = {i.prompt for i in task.pools["train"]}
    held_out = {i.prompt for i in task.pools["eval"]}
    assert not train & held_out and len(train | held_out) == len(RECORDS) and held_out
    again = get_task("file", path=str(path), fields=FIELDS, eval_fraction=0.25)
    assert {i.prompt for i in again.pools["eval"]} == held_out
    assert task.items("train", 10, seed=1) == task.items("train", 10, seed=1)
    assert task.items("train", 10, seed=1) != task.items("train", 10, seed=2)
    # The train split repeats (one full pass, then a reshuffled one); eval stops at its size.
    many = task.items("train", 2 * len(train), seed=0)
    assert sorted(i.prompt for i in many[: len(train)]) == sorted(train)
    assert len(task.items("eval", 1000, seed=0)) == len(held_out)


def test_eval_path_and_chat_messages_with_system_prompt(tmp_path):
    chat = [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "1+1="},
                {"role": "assistant", "content": "2"},
            ]
        },
        {"messages": [{"role": "user", "content": "2+2="}], "answer": 4, "system": "Sum."},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", chat)
    held_out = write_jsonl(tmp_path / "eval.jsonl", chat[1:])
    task = get_task(f"jsonl:{train}", eval_path=str(held_out), shuffle=False)
    first, second = task.pools["train"]
    assert first.answer == "2" and first.prompt == "1+1="  # the assistant turn is the reference
    assert item_messages(first, "ignored") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "1+1="},
    ]
    assert second.answer == "4"
    assert item_messages(second, "fallback")[0] == {"role": "system", "content": "Sum."}
    assert [i.prompt for i in task.pools["eval"]] == ["2+2="]
    tokenizer = build_char_tokenizer("0123456789+=SumBetrs. ")
    assert tokenizer.decode(encode_prompt(tokenizer, second)) == "Sum.2+2="


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"solution": "3"}', "missing field 'question'"),
        ('{"question": "1+2="}', "missing field 'solution'"),
        ('["a", "list"]', "must be an object"),
        ('{"question": {"nested": 1}, "solution": "1"}', "must be text"),
        ('{"messages": [{"content": "hi"}], "solution": "1"}', "needs a role"),
    ],
)
def test_a_malformed_record_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3], raw_lines=[bad_line])
    with pytest.raises(SourceError, match=message) as err:
        get_task(f"jsonl:{path}", fields=FIELDS)
    assert f"{path}:4:" in str(err.value)
    assert "skip_bad_rows" in str(err.value)


def test_skip_bad_rows_skips_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:5], raw_lines=["{oops", '{"x": 1}'])
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        task = get_task(f"jsonl:{path}", fields=FIELDS, skip_bad_rows=True)
    assert len(all_items(task)) == 5
    assert [s.split(": ")[0] for s in task.skipped_rows] == [f"{path}:6", f"{path}:7"]


def test_csv_row_with_extra_cells_names_its_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", RECORDS[:2])
    with open(path, "a") as handle:
        handle.write("1+1=,2,extra\n")
    with pytest.raises(SourceError, match=rf"{path}:4: has 2 columns"):
        get_task(f"csv:{path}", fields=FIELDS)


def test_user_mistakes_are_one_line_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(ValueError, match="not found"):
        get_task("jsonl:/no/such/file.jsonl")
    with pytest.raises(ValueError, match=r"needs task\.options\.path"):
        get_task("file")
    with pytest.raises(ValueError, match="unknown field name"):
        get_task(f"jsonl:{path}", fields={"question": "prompt"})
    with pytest.raises(ValueError, match="unknown verifier"):
        get_task(f"jsonl:{path}", fields=FIELDS, verifier="fuzzy")
    (tmp_path / "d.txt").write_text("{}")
    with pytest.raises(ValueError, match="cannot tell the format"):
        get_task("file", path=str(tmp_path / "d.txt"), fields=FIELDS)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("yaml:whatever")


def test_prompts_only_source_with_no_verifier(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"say {i}"} for i in range(20)])
    task = get_task(f"jsonl:{path}", verifier="none", eval_fraction=0.5)
    item = task.items("train", 1, 0)[0]
    assert item.answer == "" and task.score("anything", item) == 0.0


def test_the_first_csv_record_is_line_two(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,solution\n1+1=\n2+2=,4\n")
    with pytest.raises(SourceError, match=rf"{path}:2: has 2 columns"):
        get_task(f"csv:{path}", fields=FIELDS)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_undecodable_bytes_name_their_line_and_are_skippable(tmp_path, fmt):
    good = [json.dumps(r).encode() for r in RECORDS[:3]]
    if fmt == "csv":
        good = [f"{r['question']},{r['solution']}".encode() for r in RECORDS[:3]]
        good.insert(0, b"question,solution")
    path = tmp_path / f"d.{fmt}"
    bad = b'{"question": "\xff+1=", "solution": "2"}' if fmt == "jsonl" else b"\xff+1=,2"
    path.write_bytes(b"\n".join([*good[:2], bad, *good[2:]]) + b"\n")
    with pytest.raises(SourceError, match=rf"{path}:3: not UTF-8 \(byte 0xff"):
        get_task(f"{fmt}:{path}", fields=FIELDS)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        task = get_task(f"{fmt}:{path}", fields=FIELDS, skip_bad_rows=True)
    assert len(all_items(task)) == 3
    assert task.skipped_rows[0].startswith(f"{path}:3: not UTF-8")


def test_undecodable_json_file_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"question": "1+1=", "solution": "2"},\n{"question": "\xfe"}\n]')
    with pytest.raises(SourceError, match=rf"{path}:3: not UTF-8 \(byte 0xfe"):
        get_task(f"json:{path}", fields=FIELDS)


def test_a_csv_field_longer_than_pythons_default_limit_is_read(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"question": "x" * 200_000, "solution": "1"}])
    task = get_task(f"csv:{path}", fields=FIELDS, eval_fraction=0)
    assert len(task.pools["train"][0].prompt) == 200_000


@pytest.mark.parametrize(
    ("name", "options", "names"),
    [
        ("jsonl:{dir}", {}, ["is a directory", "hf:PATH"]),
        ("file", {"path": "{dir}", "format": "csv"}, ["is a directory"]),
        ("jsonl:{file}", {"colour": "red"}, ["unknown option", "colour", "skip_bad_rows"]),
        ("jsonl:{file}", {"eval_fraction": "half"}, ["task.options.eval_fraction"]),
        ("jsonl:{file}", {"skip_bad_rows": "yes"}, ["task.options.skip_bad_rows"]),
        ("jsonl:{file}", {"timeout_s": float("inf")}, ["timeout_s", "(0, 3600]"]),
        ("add", {"digits": "abc"}, ["task.options.digits", "integer", "'abc'"]),
        ("add", {"digits": True}, ["task.options.digits", "integer"]),
        ("add", {"digits": 10**12}, ["digits", "1..1000"]),
        ("reverse", {"max_length": 2.5}, ["task.options.max_length"]),
        ("chain", {"max_steps": "four"}, ["task.options.max_steps"]),
    ],
)
def test_bad_task_options_are_one_line_errors(tmp_path, name, options, names):
    file = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    fill = {"dir": str(tmp_path), "file": str(file)}
    options = {k: v.format(**fill) if isinstance(v, str) else v for k, v in options.items()}
    if ":" in name:
        options["fields"] = FIELDS
    with pytest.raises(ValueError) as info:
        get_task(name.format(**fill), **options)
    message = str(info.value)
    assert "\n" not in message
    for part in names:
        assert part in message
