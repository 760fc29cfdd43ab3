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
  N the scored positions, row by row. Requests that arrive while the model is busy are
  merged into one forward pass (up to `max_batch_tokens`).
- `POST /v1/generate` `{prompts, max_new_tokens: [int], temperature, top_p, seed}`:
  teacher samples for guidance prefixes, `[{tokens, logprobs, finished}]`.

Binds 127.0.0.1 unless told otherwise and refuses to listen elsewhere without a token.
Bodies, sequence lengths, tokens per request and top-k are bounded; a malformed or
oversize request gets a 4xx answer with a one-line `detail`, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save as save_tensors

from tropd.batch import TEACHER, TokenBatch, right_pad
from tropd.rollout.engine import HFEngine, SamplingParams
from tropd.teacher import score_batch
from tropd.teacher.remote import TOKEN_ENV, tokenizer_fingerprint

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 2**20
    max_sequence_length: int = 32768
    max_request_tokens: int = 1 << 20  # tokens in one request, all sequences together
    max_batch_tokens: int = 1 << 16  # tokens merged into one forward pass
    max_top_k: int = 1024
    chunk_size: int = 1024  # positions per log-softmax chunk (as teacher.chunk_size)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Request):
    sequences: list[list[int]] = Field(min_length=1)
    response_start: list[int]
    top_k: int = Field(ge=0)  # 0: no top-k in the answer
    entropy: bool = True


class GenerateRequest(_Request):
    prompts: list[list[int]] = Field(min_length=1)
    max_new_tokens: list[int]
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


def create_app(model, tokenizer, name: str, token: str | None, limits: Limits):
    """The FastAPI application serving `model` (already on its device, in eval mode)."""
    vocab_size = model.get_output_embeddings().weight.shape[0]
    max_top_k = min(limits.max_top_k, vocab_size)
    model_lock = asyncio.Lock()  # one forward pass at a time, scoring or generating
    queue: asyncio.Queue = asyncio.Queue()

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(_score_worker(queue, model_lock, model, limits))
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
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > limits.max_body_bytes:
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

    def check_sequences(sequences: list[list[int]]) -> None:
        total = sum(len(s) for s in sequences)
        if total > limits.max_request_tokens:
            raise HTTPException(
                413, f"{total} tokens; the limit per request is {limits.max_request_tokens}"
            )
        for i, seq in enumerate(sequences):
            if len(seq) > limits.max_sequence_length:
                raise HTTPException(
                    422,
                    f"sequence {i} has {len(seq)} tokens; the limit is "
                    f"{limits.max_sequence_length}",
                )
            if seq and not 0 <= min(seq) <= max(seq) < vocab_size:
                raise HTTPException(422, f"sequence {i}: token ids must be in [0, {vocab_size})")

    @app.get("/v1/info")
    async def info() -> dict:
        return {
            "model": name,
            "vocab_size": vocab_size,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_top_k": max_top_k,
            "max_sequence_length": limits.max_sequence_length,
            "max_request_tokens": limits.max_request_tokens,
            "max_body_bytes": limits.max_body_bytes,
        }

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        job = await read(request, ScoreRequest)
        check_sequences(job.sequences)
        if len(job.response_start) != len(job.sequences):
            raise HTTPException(422, "response_start needs one entry per sequence")
        for i, (seq, start) in enumerate(zip(job.sequences, job.response_start, strict=True)):
            if not 1 <= start <= len(seq):
                raise HTTPException(422, f"response_start[{i}]={start} is not in [1, {len(seq)}]")
        if job.top_k > max_top_k:
            raise HTTPException(422, f"top_k {job.top_k} exceeds the limit {max_top_k}")
        done = asyncio.get_running_loop().create_future()
        await queue.put((job, done))
        return Response(save_tensors(await done), media_type="application/octet-stream")

    @app.post("/v1/generate")
    async def generate(request: Request) -> list[dict]:
        job = await read(request, GenerateRequest)
        check_sequences(job.prompts)
        if len(job.max_new_tokens) != len(job.prompts) or min(job.max_new_tokens) < 1:
            raise HTTPException(422, "max_new_tokens needs one positive entry per prompt")
        engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
        params = [SamplingParams(n, job.temperature, job.top_p) for n in job.max_new_tokens]

        def run():
            with torch.random.fork_rng(devices=[]):
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                return engine.generate(job.prompts, params)

        async with model_lock:
            generations = await asyncio.to_thread(run)
        return [
            {"tokens": g.tokens, "logprobs": g.logprobs, "finished": g.finished}
            for g in generations
        ]

    return app


async def _score_worker(queue: asyncio.Queue, model_lock: asyncio.Lock, model, limits: Limits):
    """Take every scoring request that is waiting (up to `max_batch_tokens`), score them in
    one forward pass on a worker thread, answer each; repeat."""
    carried = None
    while True:
        jobs = [carried or await queue.get()]
        carried = None
        size = sum(len(s) for s in jobs[0][0].sequences)
        while not queue.empty():
            job = queue.get_nowait()
            extra = sum(len(s) for s in job[0].sequences)
            if size + extra > limits.max_batch_tokens:
                carried = job
                break
            jobs.append(job)
            size += extra
        try:
            async with model_lock:
                results = await asyncio.to_thread(
                    score_requests, model, [j for j, _ in jobs], limits.chunk_size
                )
        except Exception as err:  # answer every waiting request, keep serving
            for _, done in jobs:
                if not done.done():
                    done.set_exception(err)
            continue
        for (_, done), result in zip(jobs, results, strict=True):
            if not done.done():
                done.set_result(result)


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
            f"--token or ${TOKEN_ENV}, or bind 127.0.0.1"
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

    limits = limits or Limits()
    if positions := getattr(model.config, "max_position_embeddings", None):
        limits = replace(limits, max_sequence_length=min(limits.max_sequence_length, positions))
    app = create_app(model, tokenizer, name, token, limits)
    uvicorn.run(app, host=host, port=port, log_level="warning")
