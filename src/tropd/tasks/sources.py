"""Prompt sources: tasks read from JSONL, JSON, Parquet or CSV files and Hugging Face
datasets on local disk.

Select one in a config with `task.name: file` and `task.options.path`, or with the
short forms `jsonl:PATH`, `parquet:PATH`, `csv:PATH`, `hf:PATH`. A record becomes an
`Item` through a field mapping (`options.fields`, defaults below): the prompt is a
text field or a chat `messages` list; a reference answer, test code, a system prompt
and a code entry point are optional. A record that cannot become an item stops
loading with one line naming the file and the line (or row), unless
`skip_bad_rows: true`, which skips and counts it (`task.skipped_rows`).

Splits: `eval_path` names a separate eval file; `train_split`/`eval_split` pick the
splits of a Hugging Face `DatasetDict` (default: `train`, and for `eval_split` set
with no `eval_path`, that split of the same dataset); otherwise a stable hash of each prompt puts
`eval_fraction` of the records in the eval split, whatever the seed. `items(split, n,
seed)` shuffles the split by seed; the train split repeats (reshuffled every pass)
when `n` exceeds it, the eval split returns at most all of its items.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tropd.tasks.sandbox import check_sandbox
from tropd.tasks.task import Item
from tropd.tasks.verifiers import Limits, code_score, get_verifier

FORMATS = ("jsonl", "json", "parquet", "csv", "hf")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
SUFFIXES[".csv"] = "csv"
ROLES = ("system", "user", "assistant")
# Fields each verifier needs besides the prompt.
NEEDS = {"exact": ("answer",), "math": ("answer",), "code": ("tests",), "none": ()}


class SourceError(ValueError):
    """A record that cannot become an item; the message starts with `file:line`."""


@dataclass(frozen=True)
class Fields:
    """Which record field holds each part of an item (a missing optional one is fine)."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"
    tests: str = "tests"
    system: str = "system"
    entry_point: str = "entry_point"
    code_prompt: str = "code_prompt"

    @classmethod
    def from_options(cls, mapping: dict[str, str] | None) -> Fields:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping or {}) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown field name(s) {', '.join(unknown)} in task.options.fields; "
                f"valid: {', '.join(valid)}"
            )
        return cls(**(mapping or {}))


def source_kind(name: str) -> str | None:
    """`"file"` for the `file` task, the format for `jsonl:PATH`-style names, else None."""
    if name == "file":
        return "file"
    prefix = name.partition(":")[0]
    return prefix if ":" in name and prefix in FORMATS else None


def detect_format(path: Path) -> str:
    """The format of `path` from its suffix, or `hf` for a directory."""
    if path.is_dir():
        return "hf"
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix; "
            f"set task.options.format to one of {', '.join(FORMATS)}"
        )
    return fmt


# --- reading records ------------------------------------------------------------------

Row = tuple[str, Any, str | None]
"""(where, record, problem): `where` is `file:line` or `file: row N`; `problem` says
why the row could not be read (then `record` is None)."""


def _not_utf8(err: UnicodeDecodeError) -> str:
    return f"not UTF-8 (byte 0x{err.object[err.start]:02x} at column {err.start + 1})"


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as handle:  # decoded line by line, so a bad byte is one bad row
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, _not_utf8(err)
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as err:
                yield where, None, f"not valid JSON ({err.msg})"
            except RecursionError:
                yield where, None, "not valid JSON (nested too deeply)"


def _json_rows(path: Path) -> Iterator[Row]:
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SourceError(f"{path}:{line}: {_not_utf8(err)}") from None
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise SourceError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise SourceError(f"{path}: a JSON source must be a list of records")
    for index, record in enumerate(data):
        yield f"{path}: record {index}", record, None


def _csv_rows(path: Path) -> Iterator[Row]:
    # Undecodable bytes become lone surrogates (surrogateescape), so the row holding them
    # is reported (and skippable) rather than the whole file failing.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        line = 1
        try:
            if _BAD_BYTE.search("".join(reader.fieldnames or [])):
                raise SourceError(f"{path}:1: the header is not UTF-8")
            line = reader.line_num + 1
            for record in reader:
                where = f"{path}:{line}"
                line = reader.line_num + 1
                if None in record or None in record.values():
                    yield where, None, f"has {len(reader.fieldnames or [])} columns in the header"
                elif bad := next(filter(None, map(_BAD_BYTE.search, record.values())), None):
                    yield where, None, f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})"
                else:
                    yield where, record, None
        except csv.Error as err:  # e.g. a field over CSV_FIELD_LIMIT: the reader cannot go on
            raise SourceError(f"{path}:{line}: not readable as CSV ({err})") from None


_BAD_BYTE = re.compile("[\udc80-\udcff]")
CSV_FIELD_LIMIT = 64 * 2**20
"""Longest CSV field in characters (Python's default, 131,072, is short for code or
long documents)."""


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            "reading Parquet needs pyarrow; install it with pip install 'tropd[data]'"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
    for index, record in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", record, None


def _hf_rows(path: Path, split: str | None) -> Iterator[Row]:
    """A dataset saved with `save_to_disk`, or a local folder of data files."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "reading a Hugging Face dataset needs datasets; install pip install 'tropd[data]'"
        ) from None
    if not path.is_dir():
        raise ValueError(f"hf source {str(path)!r} is not a local directory")
    saved = any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json"))
    data = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    if isinstance(data, datasets.DatasetDict):
        name = split or ("train" if "train" in data else next(iter(data)))
        if name not in data:
            raise ValueError(
                f"{path} has no split {name!r}; it has {', '.join(data)} "
                "(set task.options.train_split / eval_split)"
            )
        data = data[name]
    for index, record in enumerate(data):
        yield f"{path}[{split or 'train'}]: row {index}", record, None


def read_rows(path: str | Path, fmt: str | None = None, split: str | None = None) -> Iterator[Row]:
    """Every record of a source file or dataset directory, with where it is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"prompt source {str(path)!r} not found; check task.options.path")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "hf":
        return _hf_rows(path, split)
    if path.is_dir():
        raise ValueError(
            f"prompt source {str(path)!r} is a directory, not a {fmt} file; name the file, "
            "or use hf:PATH for a dataset folder"
        )
    return {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}.get(fmt, _parquet_rows)(
        path
    )


# --- records to items ------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SourceError(f"{what} must be text, got {type(value).__name__}")
    return str(value)


def _messages(value: Any, field: str) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold chats as JSON text
        except json.JSONDecodeError:
            raise SourceError(f"field {field!r} is text but not a JSON list of messages") from None
    if not isinstance(value, list) or not value:
        raise SourceError(f"field {field!r} must be a non-empty list of messages")
    chat = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise SourceError(
                f"field {field!r}: each message needs a role ({', '.join(ROLES)}) and content"
            )
        chat.append({"role": message["role"], "content": _text(message.get("content"), "content")})
    return tuple(chat)


def record_to_item(record: Any, fields: Fields, needs: tuple[str, ...]) -> Item:
    """Build an `Item` from one record; `SourceError` (without location) if it can't."""
    if not isinstance(record, dict):
        raise SourceError(f"a record must be an object/mapping, got {type(record).__name__}")

    def get(field: str) -> Any:
        value = record.get(field)
        return None if value is None or value == "" else value

    messages = None
    if get(fields.messages) is not None:
        messages = _messages(record[fields.messages], fields.messages)
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    elif get(fields.prompt) is not None:
        prompt = _text(record[fields.prompt], f"field {fields.prompt!r}")
    else:
        raise SourceError(f"missing field {fields.prompt!r} (or {fields.messages!r})")
    answer = get(fields.answer)
    if messages and messages[-1]["role"] == "assistant":
        # A chat that ends with the assistant: that turn is the reference, not the prompt.
        answer = answer if answer is not None else messages[-1]["content"]
        messages = messages[:-1]
        if not messages:
            raise SourceError(f"field {fields.messages!r} has no user message")
    for need in needs:
        if get(getattr(fields, need)) is None and not (need == "answer" and answer is not None):
            raise SourceError(f"missing field {getattr(fields, need)!r} (the verifier needs it)")
    meta = {
        key: _text(record[getattr(fields, key)], key)
        for key in ("entry_point", "code_prompt")
        if get(getattr(fields, key)) is not None
    }
    return Item(
        prompt=prompt,
        answer="" if answer is None else _text(answer, f"field {fields.answer!r}"),
        messages=messages,
        system=None if get(fields.system) is None else _text(record[fields.system], "system"),
        tests=None if get(fields.tests) is None else _text(record[fields.tests], "tests"),
        meta=meta,
    )


def load_items(
    rows: Iterator[Row], fields: Fields, needs: tuple[str, ...], skip_bad_rows: bool
) -> tuple[list[Item], list[str]]:
    """Items from `rows`, and the `where: why` of each skipped row (`skip_bad_rows`)."""
    items, skipped = [], []
    for where, record, problem in rows:
        try:
            if problem is not None:
                raise SourceError(problem)
            items.append(record_to_item(record, fields, needs))
        except SourceError as err:
            if not skip_bad_rows:
                raise SourceError(
                    f"{where}: {err} (fix the record, or set task.options.skip_bad_rows: true)"
                ) from None
            skipped.append(f"{where}: {err}")
    return items, skipped


def _in_eval(item: Item, eval_fraction: float) -> bool:
    key = json.dumps([item.messages, item.prompt], sort_keys=True)
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


# --- the task -------------------------------------------------------------------------


class SourceTask:
    """A task over items loaded once from disk (or handed in), scored by a verifier."""

    def __init__(
        self,
        name: str,
        train: list[Item],
        eval_items: list[Item],
        verifier: str = "exact",
        shuffle: bool = True,
        skipped_rows: list[str] | None = None,
        limits: Limits | None = None,
    ):
        self.name = name
        self.pools = {"train": train, "eval": eval_items}
        self.verifier_name = verifier
        self.verifier = get_verifier(verifier) if verifier != "none" else None
        if verifier == "code":
            check_sandbox()  # refuse now, before any model loads, when there is no sandbox
        self.shuffle = shuffle
        self.skipped_rows = skipped_rows or []
        self.limits = limits

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        if split not in self.pools:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(self.pools)}")
        pool = self.pools[split]
        if not pool:
            raise ValueError(
                f"task {self.name!r} has no {split} items; set task.options.eval_path or "
                "eval_fraction (or check the source's splits)"
            )
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Item] = []
        while len(out) < n:
            order = list(pool)
            if self.shuffle:
                rng.shuffle(order)
            out.extend(order[: n - len(out)])
            if split == "eval":
                break
        return out

    def score(self, response: str, item: Item) -> float:
        if self.verifier is None:
            return 0.0
        if self.verifier_name == "code":
            return code_score(response, item, self.limits)
        return self.verifier(response, item)


def make_source_task(
    name: str,
    path: str | None = None,
    format: str | None = None,
    fields: dict[str, str] | None = None,
    verifier: str = "exact",
    eval_path: str | None = None,
    eval_fraction: float = 0.1,
    train_split: str | None = None,
    eval_split: str | None = None,
    skip_bad_rows: bool = False,
    shuffle: bool = True,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
) -> SourceTask:
    """The task `file` (with `path`) or `jsonl:PATH`/`parquet:PATH`/`csv:PATH`/`hf:PATH`.

    `verifier`: exact | math | code | none (no reward; accuracy reads 0).
    `timeout_s`/`memory_mb` bound each program the code verifier runs.
    """
    kind = source_kind(name)
    if kind is None:
        raise ValueError(f"{name!r} is not a prompt-source task")
    if kind != "file":
        if path is not None:
            raise ValueError(f"task {name!r} names its path already; drop task.options.path")
        path, format = name.partition(":")[2], format or kind
    if not path:
        raise ValueError("task file needs task.options.path (a JSONL/Parquet/CSV file or dir)")
    if verifier not in NEEDS:
        raise ValueError(f"unknown verifier {verifier!r}; use one of {', '.join(NEEDS)}")
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if not 0 < timeout_s <= 3600 or not 1 <= memory_mb <= 2**20:
        raise ValueError(
            f"task.options.timeout_s must be in (0, 3600] and memory_mb in 1..{2**20}, "
            f"got {timeout_s} and {memory_mb}"
        )
    field_map = Fields.from_options(fields)
    needs = NEEDS[verifier]
    train, skipped = load_items(
        read_rows(path, format, train_split), field_map, needs, skip_bad_rows
    )
    if eval_path is not None or eval_split is not None:
        source = eval_path or path
        eval_items, more = load_items(
            read_rows(source, format if eval_path is None else None, eval_split or "test"),
            field_map,
            needs,
            skip_bad_rows,
        )
        skipped += more
    else:
        eval_items = [item for item in train if _in_eval(item, eval_fraction)]
        train = [item for item in train if not _in_eval(item, eval_fraction)]
    if not train and not eval_items:
        raise ValueError(f"prompt source {path!r} holds no usable records")
    if skipped:
        warnings.warn(
            f"task {name}: skipped {len(skipped)} bad row(s); first: {skipped[0]}", stacklevel=2
        )
    return SourceTask(
        name,
        train,
        eval_items,
        verifier=verifier,
        shuffle=shuffle,
        skipped_rows=skipped,
        limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb),
    )
