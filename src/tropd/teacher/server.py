"""`tropd serve-teacher MODEL`: the teacher behind HTTP, so it can live on other GPUs or
another machine than the trainer (`teacher.url`; client in `tropd.teacher.remote`).

Endpoints (JSON requests; a bearer token when the server has one):
- `GET /v1/info`: model name, vocabulary size, tokenizer hash and the limits below.
- `POST /v1/score` `{sequences: [[id]], response_start: [int], top_k: int, entropy:
  bool}`: for every position `t >= response_start` of each sequence, the teacher's
  log-prob of token t, its top-k ids and log-probs (full-vocabulary log-softmax; only for
  `top_k > 0`) and its entropy (only when `entropy`, the default), computed by
  `tropd.teacher.score_batch`. The answer is a safetensors blob with `logprobs [N]`,
  `topk_ids [N, K]` (int32), `topk_logprobs [N, K]` and `entropy [N]` (those asked for),
  N the scored positions, row by row.
- `POST /v1/generate` `{prompts, max_new_tokens: [int], temperature, top_p, seed}`:
  teacher samples for guidance prefixes, `[{tokens, logprobs, finished}]`.

Fairness: every request is cut into chunks of whole rows, each at most `chunk_tokens`
padded tokens (rows x longest row; for generation, prompt plus new tokens), and one
worker runs one chunk per forward pass (or per `decode` of a generation chunk), taking
the pending requests in turn (round robin), a new request ahead of those already started.
So a request's first chunk waits for the pass in progress and the first chunks of the new
requests ahead of it, never for the whole of a large request; its next chunks, for one
chunk of each request in line. The model's memory is bounded by one chunk. Scoring chunks
of several requests that fit together in `chunk_tokens` share one forward pass. Every row
is scored in some chunk by the same code as unchunked; only the float32 rounding of the
batched matmuls can differ.

Binds 127.0.0.1 unless told otherwise and refuses to listen elsewhere without a token.
Bodies, sequence lengths, tokens per request, new tokens, top-k and answers are bounded;
a malformed or oversize request gets a 4xx answer with a one-line `detail` (bodies are
parsed strictly: no booleans or floats for integers, no NaN or Infinity), and the server
goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save as save_tensors

from tropd.batch import TEACHER, TokenBatch, right_pad
from tropd.rollout.engine import Generation, HFEngine, SamplingParams
from tropd.teacher import score_batch
from tropd.teacher.remote import TOKEN_ENV, answer_bytes, tokenizer_fingerprint

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_SEED = 2**63  # seeds are in [0, 2**63), what torch.manual_seed takes on every platform


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (the `serve-teacher` options)."""

    max_body_bytes: int = 64 * 2**20
    # The longest row; None: chunk_tokens. Never more than the model's positions.
    max_sequence_length: int | None = None
    # Tokens in one request, all rows together (for generation: prompts plus new tokens).
    max_request_tokens: int = 1 << 18
    chunk_tokens: int = 1 << 15  # padded tokens in one forward pass: rows x longest row
    max_new_tokens: int = 4096  # per prompt of /v1/generate
    max_answer_bytes: int = 512 * 2**20  # scores of one request (about 12 k bytes/token)
    max_top_k: int = 1024
    chunk_size: int = 1024  # positions per log-softmax chunk (as teacher.chunk_size)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


TokenIds = Annotated[list[int], Field(min_length=1)]


class ScoreRequest(_Request):
    sequences: list[TokenIds] = Field(min_length=1)
    response_start: list[int]
    top_k: int = Field(ge=0)  # 0: no top-k in the answer
    entropy: bool = True


class GenerateRequest(_Request):
    prompts: list[TokenIds] = Field(min_length=1)
    max_new_tokens: list[Annotated[int, Field(ge=1)]]
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)


@dataclass(eq=False)
class Pending:
    """A request being served: its chunks not yet run (index, row indices), the results
    of those run (index, row indices, result), and the future its handler awaits."""

    request: ScoreRequest | GenerateRequest
    chunks: deque[tuple[int, list[int]]]
    answer: asyncio.Future
    seed: int = 0  # generation: the request's seed (drawn when it gave none)
    done: list[tuple[int, list[int], Any]] = field(default_factory=list)

    def __post_init__(self):
        self.total = len(self.chunks)

    @property
    def started(self) -> bool:
        """Whether some of its chunks have been taken."""
        return len(self.chunks) < self.total

    @property
    def generating(self) -> bool:
        return isinstance(self.request, GenerateRequest)


def serving_limits(limits: Limits, model) -> Limits:
    """`limits` with the longest row cut to one chunk and to the model's positions."""
    longest = min(limits.max_sequence_length or limits.chunk_tokens, limits.chunk_tokens)
    if positions := getattr(model.config, "max_position_embeddings", None):
        longest = min(longest, positions)
    return replace(limits, max_sequence_length=longest)


def create_app(model, tokenizer, name: str, token: str | None, limits: Limits):
    """The FastAPI application serving `model` (already on its device, in eval mode)."""
    limits = serving_limits(limits, model)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    max_top_k = min(limits.max_top_k, vocab_size)
    pending: deque[Pending] = deque()
    wake = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(_worker(pending, wake, model, tokenizer, limits))
        yield
        worker.cancel()

    app = FastAPI(title="tropd teacher", lifespan=lifespan)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return Response(
                    json.dumps({"detail": "missing or wrong bearer token"}),
                    status_code=401,
                    media_type="application/json",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    async def read(request: Request, schema: type[_Request]):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise HTTPException(413, f"body over the limit of {limits.max_body_bytes} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise HTTPException(413, f"body over the limit of {limits.max_body_bytes} bytes")
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HTTPException(422, f"{where}: {first['msg']}") from None

    def check_rows(rows: list[list[int]], extra: list[int], what: str) -> None:
        """Each row (plus its `extra` new tokens) within the longest row, all of them
        within the request's tokens, and token ids in the vocabulary."""
        total = sum(len(row) + n for row, n in zip(rows, extra, strict=True))
        if total > limits.max_request_tokens:
            raise HTTPException(
                413,
                f"{total} tokens{' with the new tokens' if any(extra) else ''}; the limit per "
                f"request is {limits.max_request_tokens}: send fewer or shorter {what}s",
            )
        for i, (row, n) in enumerate(zip(rows, extra, strict=True)):
            if len(row) + n > limits.max_sequence_length:
                raise HTTPException(
                    422,
                    f"{what} {i} has {len(row)}{f' + {n} new' if n else ''} tokens; the limit "
                    f"is {limits.max_sequence_length}",
                )
            if not 0 <= min(row) <= max(row) < vocab_size:
                raise HTTPException(422, f"{what} {i}: token ids must be in [0, {vocab_size})")

    async def submit(job: ScoreRequest | GenerateRequest, costs: list[int], seed: int = 0):
        """Queue `job` in chunks and wait for its answer."""
        chunks = pack(costs, limits.chunk_tokens, by_length=isinstance(job, ScoreRequest))
        answer = asyncio.get_running_loop().create_future()
        enqueue(pending, Pending(job, deque(enumerate(chunks)), answer, seed))
        wake.set()
        return await answer

    @app.get("/v1/info")
    async def info() -> dict:
        return {
            "model": name,
            "vocab_size": vocab_size,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_top_k": max_top_k,
            "max_sequence_length": limits.max_sequence_length,
            "max_request_tokens": limits.max_request_tokens,
            "max_new_tokens": limits.max_new_tokens,
            "max_answer_bytes": limits.max_answer_bytes,
            "chunk_tokens": limits.chunk_tokens,
            "max_body_bytes": limits.max_body_bytes,
        }

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        job = await read(request, ScoreRequest)
        check_rows(job.sequences, [0] * len(job.sequences), "sequence")
        if len(job.response_start) != len(job.sequences):
            raise HTTPException(422, "response_start needs one entry per sequence")
        for i, (seq, start) in enumerate(zip(job.sequences, job.response_start, strict=True)):
            if not 1 <= start <= len(seq):
                raise HTTPException(422, f"response_start[{i}]={start} is not in [1, {len(seq)}]")
        if job.top_k > max_top_k:
            raise HTTPException(422, f"top_k {job.top_k} exceeds the limit {max_top_k}")
        spans = zip(job.sequences, job.response_start, strict=True)
        size = sum(len(seq) - start for seq, start in spans) * answer_bytes(job.top_k, job.entropy)
        if size > limits.max_answer_bytes:
            raise HTTPException(
                413,
                f"the answer would be {size} bytes; the limit is {limits.max_answer_bytes}: "
                "send fewer tokens per request or ask for a smaller top_k",
            )
        costs = [len(seq) for seq in job.sequences]
        return Response(
            save_tensors(await submit(job, costs)), media_type="application/octet-stream"
        )

    @app.post("/v1/generate")
    async def generate(request: Request) -> list[dict]:
        job = await read(request, GenerateRequest)
        if len(job.max_new_tokens) != len(job.prompts):
            raise HTTPException(422, "max_new_tokens needs one entry per prompt")
        if max(job.max_new_tokens) > limits.max_new_tokens:
            raise HTTPException(
                422,
                f"max_new_tokens {max(job.max_new_tokens)} exceeds the limit "
                f"{limits.max_new_tokens}",
            )
        check_rows(job.prompts, job.max_new_tokens, "prompt")
        costs = [len(p) + n for p, n in zip(job.prompts, job.max_new_tokens, strict=True)]
        seed = secrets.randbelow(MAX_SEED) if job.seed is None else job.seed
        generations = await submit(job, costs, seed)
        return [
            {"tokens": g.tokens, "logprobs": g.logprobs, "finished": g.finished}
            for g in generations
        ]

    return app


def pack(costs: list[int], budget: int, by_length: bool) -> list[list[int]]:
    """Row indices grouped into chunks with rows x costliest row <= `budget` (a row
    costlier than the budget gets a chunk of its own). `by_length` packs the rows from
    the longest down (less padding); otherwise in their order."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i]) if by_length else range(len(costs))
    chunks: list[list[int]] = []
    widest = 0
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * max(widest, costs[i]) <= budget:
            chunks[-1].append(i)
            widest = max(widest, costs[i])
        else:
            chunks.append([i])
            widest = costs[i]
    return chunks


def enqueue(pending: deque[Pending], work: Pending) -> None:
    """Put a new request in line ahead of those already started (behind other new ones):
    every request's first chunk runs before any request's next chunk, so a request that
    fits in one chunk waits for the pass in progress and the new requests ahead of it."""
    pending.insert(next((i for i, w in enumerate(pending) if w.started), len(pending)), work)


def next_pass(pending: deque[Pending], budget: int) -> list[tuple[Pending, int, list[int]]]:
    """The chunks `(request, chunk index, rows)` of the next forward pass, taken in turn:
    the next chunk of the first pending request, then (scoring only) the next chunk of
    each following scoring request whose rows still fit in `budget` padded tokens with
    those taken. Requests served go to the back of the line (those with chunks left);
    the others keep their place."""
    first = pending.popleft()
    picked = [(first, *first.chunks.popleft())]
    if not first.generating:
        rows, widest = _shape(first, picked[0][2])
        kept = []
        for work in pending:
            if not work.generating:
                more, wide = _shape(work, work.chunks[0][1])
                if (rows + more) * max(widest, wide) <= budget:
                    picked.append((work, *work.chunks.popleft()))
                    rows, widest = rows + more, max(widest, wide)
                    continue
            kept.append(work)
        pending.clear()
        pending.extend(kept)
    pending.extend(work for work, _, _ in picked if work.chunks)
    return picked


def _shape(work: Pending, rows: list[int]) -> tuple[int, int]:
    """Rows and longest row of a scoring chunk."""
    return len(rows), max(len(work.request.sequences[i]) for i in rows)


async def _worker(pending: deque[Pending], wake: asyncio.Event, model, tokenizer, limits):
    """Run the pending requests' chunks, one pass at a time, in turn; answer each request
    when its last chunk is done; keep serving when a pass fails."""
    while True:
        for gone in [work for work in pending if work.answer.done()]:  # handler cancelled
            pending.remove(gone)
        if not pending:
            wake.clear()
            await wake.wait()
            continue
        picked = next_pass(pending, limits.chunk_tokens)
        try:
            results = await asyncio.to_thread(_run_pass, model, tokenizer, picked, limits)
        except Exception as err:  # answer every request in the pass, keep serving
            for work, _, _ in picked:
                if work in pending:
                    pending.remove(work)
                if not work.answer.done():
                    work.answer.set_exception(err)
            continue
        for (work, index, rows), result in zip(picked, results, strict=True):
            work.done.append((index, rows, result))
            if len(work.done) == work.total and not work.answer.done():
                work.answer.set_result(_assemble(work))


def _run_pass(model, tokenizer, picked, limits: Limits) -> list[Any]:
    """The result of each picked chunk: its rows' generations, or their scores (on a
    worker thread)."""
    work, index, rows = picked[0]
    if work.generating:
        seed = chunk_seed(work.seed, index)
        return [generate_rows(model, tokenizer, work.request, rows, seed)]
    parts = [_select(work.request, rows) for work, _, rows in picked]
    return score_requests(model, parts, limits.chunk_size)


def _select(job: ScoreRequest, rows: list[int]) -> ScoreRequest:
    """The part of a scoring request made of `rows`."""
    return ScoreRequest.model_construct(
        sequences=[job.sequences[i] for i in rows],
        response_start=[job.response_start[i] for i in rows],
        top_k=job.top_k,
        entropy=job.entropy,
    )


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of a generation request's chunk `index`: the request's own seed
    for the first chunk, a hash of both for the others (so chunks never share draws)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest) % MAX_SEED


def generate_rows(
    model, tokenizer, job: GenerateRequest, rows: list[int], seed: int
) -> list[Generation]:
    """Teacher samples for the prompts `rows` of `job`, drawn with `seed` (the global
    random state is left as it was)."""
    engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    params = [SamplingParams(job.max_new_tokens[i], job.temperature, job.top_p) for i in rows]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return engine.generate([job.prompts[i] for i in rows], params)


def _assemble(work: Pending) -> Any:
    """A request's answer from its chunks' results: generations in prompt order, or the
    score tensors row by row."""
    if work.generating:
        generations: list[Generation | None] = [None] * len(work.request.prompts)
        for _, rows, result in work.done:
            for i, generation in zip(rows, result, strict=True):
                generations[i] = generation
        return generations
    job = work.request
    visited = torch.tensor([i for _, rows, _ in work.done for i in rows])
    lengths = torch.tensor(
        [len(seq) - start for seq, start in zip(job.sequences, job.response_start, strict=True)]
    )
    counts = lengths[visited]  # scored positions per row, in the chunks' order
    place = torch.empty_like(visited)
    place[visited] = torch.arange(len(visited))  # each row's place among the visited
    source = (counts.cumsum(0) - counts)[place]  # where each row's values start in them
    target = lengths.cumsum(0) - lengths  # ... and in the answer
    index = torch.repeat_interleave(source - target, lengths) + torch.arange(int(lengths.sum()))
    values = {name: torch.cat([r[name] for _, _, r in work.done]) for name in work.done[0][2]}
    return {name: v[index].contiguous() for name, v in values.items()}


def score_requests(
    model, jobs: list[ScoreRequest], chunk_size: int
) -> list[dict[str, torch.Tensor]]:
    """Score the sequences of several requests in one batch; per request, the values at
    its response positions, row by row, cut to its own top-k, with only the statistics it
    asked for."""
    rows = [seq for job in jobs for seq in job.sequences]
    starts = [start for job in jobs for start in job.response_start]
    tokens, attention = right_pad(rows, pad_id=0)
    origin = torch.zeros_like(tokens)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        origin[i, start : len(row)] = TEACHER
    top_k = max(job.top_k for job in jobs)
    entropy = any(job.entropy for job in jobs)
    device = next(model.parameters()).device
    batch = TokenBatch(tokens=tokens, origin=origin, attention_mask=attention).to(device)
    scored = score_batch(model, batch, top_k, chunk_size, entropy)
    where = batch.response_mask.nonzero(as_tuple=True)
    flat = {"logprobs": scored.teacher_logprobs[where]}
    if top_k:
        flat["topk_ids"] = scored.teacher_topk_ids[where].int()
        flat["topk_logprobs"] = scored.teacher_topk_logprobs[where]
    if entropy:
        flat["entropy"] = scored.teacher_entropy[where]
    results, begin = [], 0
    for job in jobs:
        spans = zip(job.sequences, job.response_start, strict=True)
        part = slice(begin, begin + sum(len(seq) - start for seq, start in spans))
        asked = {"logprobs"}
        if job.top_k:
            asked |= {"topk_ids", "topk_logprobs"}
        if job.entropy:
            asked.add("entropy")
        results.append(
            {
                name: (values[part, : job.top_k] if values.dim() == 2 else values[part])
                .cpu()
                .contiguous()
                for name, values in flat.items()
                if name in asked
            }
        )
        begin = part.stop
    return results


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (before any model is loaded)."""
    if token is None and host not in LOOPBACK:
        raise ValueError(
            f"serve-teacher: listening on {host} exposes the teacher; give a token with "
            f"${TOKEN_ENV} or --token-file PATH, or bind 127.0.0.1"
        )


def serve(
    model,
    tokenizer,
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: Limits | None = None,
) -> None:
    """Serve `model` (loaded, in eval mode, without gradients) and its `tokenizer` as
    `name` until interrupted. Without a token, only loopback addresses are allowed."""
    check_binding(host, token)
    import uvicorn

    app = create_app(model, tokenizer, name, token, limits or Limits())
    uvicorn.run(app, host=host, port=port, log_level="warning")
