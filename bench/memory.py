"""Peak memory of teacher scoring and of the student loss: chunked vs full `[B, T, V]` logits.

tropd promises that the fp32 tensors it forms over the vocabulary are at most
`[chunk, V]`, never `[B, T, V]`: `tropd.teacher.score_batch` runs the teacher's decoder
once and its LM head `chunk_size` response positions at a time, and `tropd.head.HeadLogits`
(the training loop's student logits when `optim.head_chunk > 0`) keeps the probabilities
of at most the last `chunk` positions for the backward and recomputes earlier ones. This
benchmark measures that on CPU against the straightforward path, `model(...).logits`
`[B, P+T, V]` through `tropd.batch.align_logits` into the same objective (the loop with
`optim.head_chunk=0`).

Operations, on B=8 rows of a 40-token prompt followed by T student-written response tokens
(random ids, random negative sampler log-probs), float32, one thread:

- `scoring`: `score_batch(teacher, batch, top_k=64, chunk_size=chunk)` with a random-weight
  Qwen2 teacher (hidden 512, 8 layers, 8 heads, intermediate 2048, tied embeddings).
- `loss (chunked head)`: a random-weight Qwen2 student (hidden 256, 4 layers, 4 heads,
  intermediate 1024, tied) in training mode: `tropd.train.loop.student_logits` (a
  `HeadLogits` with `head_chunk=chunk`), the `opd` or `tropd` objective, `loss.backward()`.
- `loss (full logits)`: the same with the aligned `[B, P+T, V]` logits (`head_chunk=0`).
- Reference rows, the backbones alone: `teacher backbone only` (the decoder forward that
  `score_batch` runs, no head) and `student backbone only` (the student's training forward
  without its head, `tropd.head.hidden_only`, its graph kept, no backward). They show what
  in the rows above grows with B x T x H (or B x T^2 through attention) and not with V;
  the reading derives "loss minus its backbone row", the table subtracts nothing.

Grid: V in {49152, 98304, 151936} at T=64 and T in {64, 256, 1024} at V=49152; chunk 1024
(the default) and 128. The loss workers read the batch the `scoring` worker of the same
(V, T) scored (teacher log-probs, top-64, entropy), so every loss sees real teacher fields.

Method. Every configuration runs in a fresh subprocess (the parent never imports torch).
The worker builds the model (from its config, `torch.manual_seed`) and all inputs, runs the
operation once on a tiny batch (1 row, 4 response tokens: library and kernel
initialisation, lazily created buffers) and drops its outputs and gradients, then
`gc.collect()` and glibc `malloc_trim(0)` (free heap pages go back to the OS, so the
operation cannot silently reuse them), reads the current RSS (`VmRSS` in
/proc/self/status) as the baseline, resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs, so earlier peaks from building the model do not count), runs the
operation once and reads `resource.getrusage(RUSAGE_SELF).ru_maxrss`.

Allocator. By default glibc raises its mmap threshold after a large block is freed (up to
32 MiB); blocks below the threshold then come from the heap, and freed heap memory stays
resident until the free top of the heap exceeds twice the threshold. The RSS would then
also count memory the operation had already freed (in a probe, a chunk-128 loss at
T=64 read about 140 MiB more that way). The workers therefore run with
`MALLOC_MMAP_THRESHOLD_=65536`, which fixes the threshold: every block above 64 KiB is its
own mapping and is unmapped when freed, so the peak tracks the memory held at once.
`--glibc-default` measures with glibc's defaults instead.

"Peak increase" = that `ru_maxrss` minus the baseline: the most resident memory the
operation added at any moment, its outputs included (the scored batch; the loss, the
autograd graph and the parameter gradients, which `zero_grad(set_to_none=True)` frees
before every step in the loop, so every step allocates them anew). Nothing is subtracted:
the numbers include the backbone's activations, which grow with B x T x H (not with V),
and the gradient of the tied embedding / LM head, `[V, H]` fp32, which grows with V but
not with T. Each row also gives the size of one `[chunk, V]` fp32 tensor (chunk capped at
the B x T response positions: a larger chunk is the whole response) and of one
`[B x T, V]` fp32 tensor, to see which one the measured increase tracks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    OFFLINE_ENV,
    STUDENT,
    TEACHER,
    ModelSpec,
    cpu_info,
    markdown,
    qwen2_config,
    run_worker_process,
    write_atomic,
)

BATCH = 8
PROMPT = 40
TOP_K = 64
SEED = 0
TINY_RESPONSE = 4  # response tokens of the warm-up batch (1 row)
CHUNKS = (1024, 128)
VOCABS = (49152, 98304, 151936)
LENGTHS = (64, 256, 1024)
BASE_VOCAB, BASE_LENGTH = VOCABS[0], LENGTHS[0]
OBJECTIVES = ("opd", "tropd")
OPS = {
    "scoring": "scoring",
    "teacher-backbone": "teacher backbone only",
    "chunked": "loss (chunked head)",
    "full": "loss (full logits)",
    "student-backbone": "student backbone only",
}
BACKBONES = ("teacher-backbone", "student-backbone")  # reference rows
# Free memory the full-logits loss needs before it is started: this many [B, P+T, V] fp32
# tensors (logits, aligned copy, the softmax and the gradients of the backward; about 5.6
# measured) plus 1 GiB for the process itself.
FULL_COPIES = 6
# glibc's mmap threshold in the workers (MALLOC_MMAP_THRESHOLD_, bytes): fixed, so every
# block above it is its own mapping, returned to the OS on free (see the docstring).
MMAP_THRESHOLD = 64 * 1024
RESULT_MARKER = "@@memory-result@@ "
WORKER_TIMEOUT_S = 900
MIB = 2**20
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memory"


@dataclass(frozen=True)
class Case:
    op: str  # a key of OPS
    vocab: int
    length: int  # response tokens per row (T)
    chunk: int | None = None  # None: full logits or a backbone
    objective: str | None = None  # None: scoring or a backbone

    @property
    def label(self) -> str:
        parts = [self.op, f"V={self.vocab}", f"T={self.length}"]
        if self.chunk is not None:
            parts.append(f"chunk={self.chunk}")
        if self.objective is not None:
            parts.append(self.objective)
        return " ".join(parts)

    @property
    def positions(self) -> int:
        """Response positions B x T: the rows the LM head is applied to when chunked."""
        return BATCH * self.length

    def tensor_mib(self, rows: int) -> float:
        return rows * self.vocab * 4 / MIB


def grid() -> list[tuple[int, int]]:
    """(V, T) points: the vocabulary sweep at the base length, then the length sweep."""
    points = [(v, BASE_LENGTH) for v in VOCABS]
    return points + [(BASE_VOCAB, t) for t in LENGTHS if t != BASE_LENGTH]


def cases_at(vocab: int, length: int) -> list[Case]:
    """Scoring first: its first worker writes the scored batch the loss workers read."""
    out = [Case("scoring", vocab, length, chunk) for chunk in CHUNKS]
    out.append(Case("teacher-backbone", vocab, length))
    for objective in OBJECTIVES:
        out += [Case("chunked", vocab, length, chunk, objective) for chunk in CHUNKS]
        out.append(Case("full", vocab, length, None, objective))
    out.append(Case("student-backbone", vocab, length))
    return out


# --- worker -----------------------------------------------------------------------


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Set the peak-RSS counter (VmHWM, hence ru_maxrss) to the current RSS; False where
    the kernel does not allow it (then earlier peaks could hide the operation's)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and return glibc's free heap pages to the OS."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def qwen2(spec: ModelSpec, vocab: int, seed: int):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(spec, vocab, max_positions=2048)).float()


def make_batch(vocab: int, length: int, rows: int = BATCH):
    """`rows` x (PROMPT prompt tokens + `length` student tokens), random ids (never 0-2),
    sampler log-probs uniform in [-8, 0) on the student tokens."""
    import torch

    from tropd.batch import PROMPT as PROMPT_ORIGIN
    from tropd.batch import STUDENT as STUDENT_ORIGIN
    from tropd.batch import TokenBatch

    g = torch.Generator().manual_seed(SEED + length)
    tokens = torch.randint(3, vocab, (rows, PROMPT + length), generator=g)
    origin = torch.full_like(tokens, PROMPT_ORIGIN)
    origin[:, PROMPT:] = STUDENT_ORIGIN
    sampler = -8 * torch.rand(tokens.shape, generator=g) * (origin == STUDENT_ORIGIN)
    return TokenBatch(tokens=tokens, origin=origin, sampler_logprobs=sampler)


def tiny_of(batch):
    """The warm-up batch: the first row, prompt + TINY_RESPONSE tokens, every field."""
    from dataclasses import fields

    from tropd.batch import TokenBatch

    width = PROMPT + TINY_RESPONSE
    parts = {
        f.name: value[:1, :width].clone()
        for f in fields(batch)
        if (value := getattr(batch, f.name)) is not None
    }
    return TokenBatch(**parts)


def measure(op, warmup) -> tuple[dict[str, Any], Any]:
    """Warm up, baseline, run `op` once: (peak increase etc. in MiB, see the module
    docstring; what `op` returned)."""
    warmup()
    release_free_memory()
    baseline_kib = proc_status_kib("VmRSS")
    reset_ok = reset_peak_rss()
    start_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    keep = op()
    seconds = time.perf_counter() - tic
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_kib = proc_status_kib("VmHWM")
    stats = {
        "baseline_mib": baseline_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "increase_mib": (peak_kib - baseline_kib) / 1024,
        "vm_hwm_mib": hwm_kib / 1024,
        "maxrss_at_start_mib": start_maxrss_kib / 1024,
        "peak_reset": reset_ok,
        # Without a reset, an earlier peak above baseline + increase would hide this one.
        "peak_hidden": peak_kib == start_maxrss_kib and start_maxrss_kib > baseline_kib + 1024,
        "op_s": seconds,
    }
    return stats, keep


def worker(case: Case, data: Path, save: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    batch_file = data / f"scored-v{case.vocab}-t{case.length}.pt"
    if case.op == "teacher-backbone":
        from tropd.head import final_hidden_states

        teacher = qwen2(TEACHER, case.vocab, SEED).eval()
        batch = make_batch(case.vocab, case.length)
        tiny = tiny_of(batch)

        @torch.no_grad()
        def backbone(micro):
            return final_hidden_states(teacher, micro.tokens, micro.attention_mask)

        return measure(lambda: backbone(batch), lambda: backbone(tiny))[0]
    if case.op == "student-backbone":
        from tropd.head import hidden_only

        student = qwen2(STUDENT, case.vocab, SEED + 1).train()
        batch = make_batch(case.vocab, case.length)
        tiny = tiny_of(batch)

        def forward(micro):  # the hidden states `HeadLogits` gets, with their graph
            inputs = {"input_ids": micro.tokens, "attention_mask": micro.attention_mask}
            return hidden_only(student, **inputs).hidden_states[-1]

        def warmup():
            forward(tiny).sum().backward()
            student.zero_grad(set_to_none=True)

        return measure(lambda: forward(batch), warmup)[0]
    if case.op == "scoring":
        from tropd.teacher import score_batch

        teacher = qwen2(TEACHER, case.vocab, SEED).eval()
        batch = make_batch(case.vocab, case.length)
        tiny = tiny_of(batch)
        result, scored = measure(
            lambda: score_batch(teacher, batch, TOP_K, chunk_size=case.chunk),
            lambda: score_batch(teacher, tiny, TOP_K, chunk_size=case.chunk),
        )
        if save:
            tmp = batch_file.with_name(f".{batch_file.name}.tmp")
            torch.save({k: v for k, v in vars(scored).items() if v is not None}, tmp)
            tmp.replace(batch_file)
        return result

    from types import SimpleNamespace

    from tropd.batch import TokenBatch
    from tropd.objectives import get_objective
    from tropd.train.loop import student_logits

    if not batch_file.exists():
        raise FileNotFoundError(f"{batch_file}: the scoring worker of this (V, T) failed")
    batch = TokenBatch(**torch.load(batch_file))
    tiny = tiny_of(batch)
    student = qwen2(STUDENT, case.vocab, SEED + 1).train()
    objective = get_objective(case.objective)
    chunked = case.op == "chunked"
    setup = SimpleNamespace(  # what `student_logits` reads of the loop's Setup
        chunked_head=chunked,
        student=student,
        config=SimpleNamespace(optim=SimpleNamespace(head_chunk=case.chunk or 0)),
    )

    def step(micro):
        logits = student_logits(setup, student, micro)
        gate = torch.Generator().manual_seed(SEED)
        out = objective(logits, micro, generator=gate, step=1)
        out.loss.backward()
        return out

    def warmup():
        step(tiny)
        student.zero_grad(set_to_none=True)

    result, _ = measure(lambda: step(batch), warmup)
    return result


def run_worker(case: Case, data: Path, save: bool, glibc_default: bool) -> dict[str, Any]:
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(asdict(case)),
        "--data",
        str(data),
    ]
    if save:
        command.append("--save")
    result, wall = run_worker_process(command, env, RESULT_MARKER, WORKER_TIMEOUT_S, tail=20)
    return {**result, "worker_s": wall}


def source_fingerprint() -> dict[str, Any]:
    """The git commit and a sha256 over every file under src/tropd: the code measured (taken
    before and after the run; a change in between means rows measured different code)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted((root / "src" / "tropd").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {"commit": commit or None, "src_sha256": digest.hexdigest()}


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


# --- report -----------------------------------------------------------------------


def sizes(case: Case) -> dict[str, Any]:
    rows = min(case.chunk, case.positions) if case.chunk else None
    return {
        "chunk_rows": rows,
        "chunk_v_mib": case.tensor_mib(rows) if rows else None,
        "bt_v_mib": case.tensor_mib(case.positions),
        "full_logits_mib": case.tensor_mib(BATCH * (PROMPT + case.length)),
    }


def table_cells(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = [
        "operation",
        "objective",
        "V",
        "T",
        "chunk",
        "[chunk,V] MiB",
        "[B·T,V] MiB",
        "peak increase MiB",
        "÷ [chunk,V]",
        "÷ [B·T,V]",
        "baseline RSS MiB",
        "op s",
    ]
    cells = []
    for r in results:
        c = r["case"]
        chunk = r["chunk_v_mib"]
        label = [
            OPS[c["op"]],
            c["objective"] or "",
            str(c["vocab"]),
            str(c["length"]),
            "" if c["chunk"] is None else f"{c['chunk']} ({r['chunk_rows']} rows)",
            "" if chunk is None else f"{chunk:.0f}",
            f"{r['bt_v_mib']:.0f}",
        ]
        if "increase_mib" not in r:
            reason = r.get("skipped") or "failed: " + r.get("error", "?").splitlines()[0]
            cells.append([*label, reason, "", "", "", ""])
            continue
        inc = r["increase_mib"]
        flag = " (!)" if r["peak_hidden"] else ""
        backbone = c["op"] in BACKBONES
        cells.append(
            [
                *label,
                f"{inc:.0f}{flag}",
                "" if chunk is None else f"{inc / chunk:.2f}",
                "" if backbone else f"{inc / r['bt_v_mib']:.2f}",
                f"{r['baseline_mib']:.0f}",
                f"{r['op_s']:.1f}",
            ]
        )
    return head, cells


def _find(results, **match) -> dict[str, Any] | None:
    for r in results:
        if all(r["case"][k] == v for k, v in match.items()) and "increase_mib" in r:
            return r
    return None


def _excess(results, row: dict[str, Any]) -> float | None:
    """`row`'s increase minus the backbone reference of the same (V, T), for a loss row."""
    c = row["case"]
    ref = _find(results, op="student-backbone", vocab=c["vocab"], length=c["length"])
    return None if ref is None else row["increase_mib"] - ref["increase_mib"]


def _growth(results, sweep: str, fixed: dict[str, Any], values, ops, excess=False) -> list[str]:
    """Phrases 'label a -> b MiB (xN)' from the first to the last of `values` of `sweep`,
    per variant of `ops`; with `excess`, of the increase minus the student backbone's."""
    variants = {
        "scoring": [(c, None) for c in CHUNKS],
        "teacher-backbone": [(None, None)],
        "chunked": [(c, o) for c in CHUNKS for o in OBJECTIVES],
        "full": [(None, o) for o in OBJECTIVES],
        "student-backbone": [(None, None)],
    }
    phrases = []
    for op in ops:
        for chunk, objective in variants[op]:
            match = {"op": op, "chunk": chunk, "objective": objective, **fixed}
            ends = [_find(results, **match, **{sweep: v}) for v in (values[0], values[-1])]
            if None in ends:
                continue
            a, b = (_excess(results, e) if excess else e["increase_mib"] for e in ends)
            if a is None or b is None:
                continue
            name = OPS[op] + (f" chunk {chunk}" if chunk else "")
            name += f" {objective}" if objective else ""
            phrases.append(f"{name} {a:.0f} → {b:.0f} MiB (×{b / a:.1f})")
    return phrases


def reading(results: list[dict[str, Any]]) -> str:
    """A paragraph on how the numbers scale, computed from `results`."""
    parts = []
    t_first, t_last = LENGTHS[0], LENGTHS[-1]
    rows_first, rows_last = (min(CHUNKS[0], BATCH * t) for t in (t_first, t_last))
    every = ["scoring", "teacher-backbone", "chunked", "full", "student-backbone"]
    phrases = _growth(results, "length", {"vocab": BASE_VOCAB}, LENGTHS, every)
    if phrases:
        parts.append(
            f"From T={t_first} to T={t_last} at V={BASE_VOCAB} (B·T·V ×{t_last / t_first:.0f}; "
            f"one [chunk,V] tensor ×{rows_last / rows_first:.0f} at chunk {CHUNKS[0]}, ×1 at "
            f"chunk {CHUNKS[1]}) the peak increase went: " + "; ".join(phrases) + "."
        )
    fixed = {"vocab": BASE_VOCAB}
    phrases = _growth(results, "length", fixed, LENGTHS, ["chunked", "full"], excess=True)
    if phrases:
        parts.append(
            "The same loss rows minus the student backbone row of their (V, T) (what the "
            "head, the objective and the backward add on top of the decoder's forward and its "
            "graph; derived here, not subtracted in the table): " + "; ".join(phrases) + "."
        )
    scores = [
        _find(results, op=op, chunk=chunk, vocab=BASE_VOCAB, length=t_last)
        for op, chunk in (
            ("teacher-backbone", None),
            ("scoring", CHUNKS[1]),
            ("scoring", CHUNKS[0]),
        )
    ]
    if None not in scores:
        back, small, large = (r["increase_mib"] for r in scores)
        parts.append(
            "Scoring's peak is the larger of the teacher backbone's own (its activations are "
            "transient, freed before the head runs) and the head chunks': at "
            f"T={t_last} the teacher backbone alone added {back:.0f} MiB, scoring "
            f"{small:.0f} MiB at chunk {CHUNKS[1]} and {large:.0f} MiB at chunk {CHUNKS[0]}."
        )
    v_first, v_last = VOCABS[0], VOCABS[-1]
    phrases = _growth(results, "vocab", {"length": BASE_LENGTH}, VOCABS, every)
    if phrases:
        parts.append(
            f"From V={v_first} to V={v_last} at T={BASE_LENGTH} (×{v_last / v_first:.2f}, the "
            f"same factor for [chunk,V] and [B·T,V]; B·T={BATCH * BASE_LENGTH}, so chunk "
            f"{CHUNKS[0]} is the whole response there): " + "; ".join(phrases) + "."
        )
    full, c128, c1024 = (
        _find(results, vocab=BASE_VOCAB, length=t_last, op=op, chunk=chunk, objective="tropd")
        for op, chunk in (("full", None), ("chunked", CHUNKS[1]), ("chunked", CHUNKS[0]))
    )
    if full and c128:
        parts.append(
            f"At T={t_last}, V={BASE_VOCAB} the full-logits tropd loss added "
            f"{full['increase_mib']:.0f} MiB = {full['increase_mib'] / full['bt_v_mib']:.1f} × "
            f"[B·T,V] ({full['bt_v_mib']:.0f} MiB; its logits cover the prompt too, "
            f"{full['full_logits_mib']:.0f} MiB), against {c128['increase_mib']:.0f} MiB with "
            f"the chunked head at chunk {CHUNKS[1]} "
            f"(×{full['increase_mib'] / c128['increase_mib']:.1f} less)"
            + (f" and {c1024['increase_mib']:.0f} MiB at chunk {CHUNKS[0]}" if c1024 else "")
            + "."
        )
    grads = []
    for v in (v_first, v_last):
        mib = v * STUDENT.hidden * 4 / MIB
        r = _find(results, op="chunked", chunk=CHUNKS[1], objective="opd", vocab=v, length=t_first)
        share = (
            ""
            if r is None
            else f" ({100 * mib / r['increase_mib']:.0f}% of the chunk-{CHUNKS[1]} opd loss's)"
        )
        grads.append(f"{mib:.0f} MiB at V={v}" + share)
    parts.append(
        f"The student's [V,H] fp32 embedding/head gradient alone is {' and '.join(grads)} at "
        f"T={t_first}; the backward forms the head's and the embedding's parts separately and "
        "sums them: a part of every loss row that grows with V·H whatever the chunk and T."
    )
    return " ".join(parts)


def machine_info() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next((int(x.split()[1]) for x in meminfo if x.startswith("MemTotal:")), 0)
    return {**cpu_info(), "memory_gib": round(total / 2**20, 1), "kernel": platform.release()}


SETTINGS = (
    f"B={BATCH} rows, {PROMPT}-token prompt + T student tokens, float32, 1 thread, "
    f"top_k={TOP_K}. Teacher Qwen2 {asdict(TEACHER)}; student Qwen2 {asdict(STUDENT)}; "
    "tied embeddings, random weights. Peak increase = ru_maxrss after the operation − VmRSS "
    "just before it (peak counter reset via /proc/self/clear_refs, after a tiny warm-up, "
    "gc and malloc_trim), one fresh process per row. It includes everything the operation "
    "allocates: the backbone's activations (grow with B·T·H, not V), the outputs, and for "
    "the loss the autograd graph and the parameter gradients (the tied [V,H] embedding "
    "gradient grows with V). [chunk,V]: one fp32 tensor of min(chunk, B·T) rows; "
    "[B·T,V]: one fp32 tensor over the response positions (the full-logits path's tensors "
    "are [B·(P+T),V], the prompt included). ÷: the increase over that size. The backbone "
    "rows are references (the decoder without its head), not subtracted anywhere."
)


def settings_line(glibc_default: bool) -> str:
    malloc = (
        "glibc malloc defaults (dynamic mmap threshold)"
        if glibc_default
        else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (freed blocks leave the RSS at once)"
    )
    return SETTINGS + f" Allocator: {malloc}."


def report(
    args,
    results: list[dict[str, Any]],
    versions: dict[str, str],
    wall: float,
    source: dict[str, Any],
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    head, cells = table_cells(results)
    console = Console(width=None if Console().is_terminal else 200)
    table = Table(title="Peak memory increase: chunked vs full logits")
    for name in head:
        table.add_column(
            escape(name), justify="left" if name in ("operation", "objective") else "right"
        )
    for row in cells:
        table.add_row(*row)
    console.print(table)
    text = reading(results)
    settings = settings_line(args.glibc_default)
    console.print(settings, markup=False)
    console.print(text, markup=False)
    hidden = [r for r in results if r.get("peak_hidden")]
    if hidden:
        console.print(f"(!) {len(hidden)} rows: the peak counter could not be reset", markup=False)
    start = source["start"]
    source_line = f"Source: commit {start['commit']}, src/tropd sha256 {start['src_sha256'][:12]}."
    if source["changed_during_run"]:
        source_line += " WARNING: src/tropd changed during the run; rows may mix code versions."
    console.print(source_line, markup=False)
    command = "python bench/memory.py " + " ".join(sys.argv[1:])
    machine = {**machine_info(), **versions}
    out = Path(args.out)
    write_atomic(
        out / "table.md",
        "# Peak memory: teacher scoring and student loss, chunked vs full logits\n\n"
        f"{markdown(head, cells)}\n\n## Reading\n\n{text}\n\n## Settings\n\n{settings}\n\n"
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{machine['memory_gib']} GiB; Linux {machine['kernel']}; Python {machine['python']}, "
        f"torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}. "
        f"Total wall time {wall / 60:.1f} min.\n\n{source_line}\n\n"
        f"Reproduce: `{command.strip()}`\n",
    )
    payload = {
        "settings": {
            "command": command.strip(),
            "batch": BATCH,
            "prompt": PROMPT,
            "top_k": TOP_K,
            "chunks": CHUNKS,
            "vocabs": VOCABS,
            "lengths": LENGTHS,
            "teacher": asdict(TEACHER),
            "student": asdict(STUDENT),
            "objectives": OBJECTIVES,
            "glibc_default": args.glibc_default,
            "mmap_threshold": None if args.glibc_default else MMAP_THRESHOLD,
            "summary_line": settings,
        },
        "machine": machine,
        "source": source,
        "wall_s": wall,
        "reading": text,
        "results": results,
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    console.print(f"wrote {out / 'table.md'} and {out / 'results.json'}")


# --- main -------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where table.md and results go")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's dynamic mmap threshold on in the workers (noisier, see the docstring)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        case = Case(**json.loads(args.worker))
        result = worker(case, Path(args.data), args.save)
        import torch
        import transformers

        result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    tic = time.perf_counter()
    source = {"start": source_fingerprint()}
    results: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tropd-memory-") as data:
        for vocab, length in grid():
            for i, case in enumerate(cases_at(vocab, length)):
                row: dict[str, Any] = {"case": asdict(case), **sizes(case)}
                need = FULL_COPIES * row["full_logits_mib"] + 1024
                if case.op == "full" and mem_available_mib() < need:
                    row["skipped"] = (
                        f"skipped: needs ~{need / 1024:.1f} GiB, "
                        f"{mem_available_mib() / 1024:.1f} GiB available"
                    )
                else:
                    row.update(run_worker(case, Path(data), i == 0, args.glibc_default))
                    versions = row.pop("versions", versions)
                results.append(row)
                note = (
                    f"+{row['increase_mib']:.0f} MiB over {row['baseline_mib']:.0f} MiB, "
                    f"op {row['op_s']:.1f} s, worker {row['worker_s']:.0f} s"
                    if "increase_mib" in row
                    else (row.get("skipped") or "FAILED: " + row["error"].splitlines()[0])
                )
                print(f"{case.label:38} {note}", flush=True)
    source["end"] = source_fingerprint()
    source["changed_during_run"] = source["start"] != source["end"]
    report(args, results, versions, time.perf_counter() - tic, source)


if __name__ == "__main__":
    main()
