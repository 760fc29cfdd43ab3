"""Teachers behind HTTP, used when `teacher.url` is set.

- `TropdTeacher` talks to `tropd serve-teacher` (see `tropd.teacher.server`): exact
  top-k log-probs from the full-vocabulary log-softmax and the exact entropy.
- `OpenAITeacher` talks to an OpenAI-compatible completion server that returns prompt
  log-probs, such as vLLM (`prompt_logprobs`, a vLLM extension). vLLM returns at most
  `--max-logprobs` (default 20) log-probs per position: start it with
  `--max-logprobs K` for `teacher.top_k: K` (the paper's 64). It cannot return the
  entropy; `teacher_entropy` is the top-k part plus the remaining mass as one outcome,
  a lower bound.

Both score a `TokenBatch` like `tropd.teacher.score_batch` and generate teacher prefixes
like an `Engine`. Requests time out, are retried with exponential backoff (1 s, 2 s,
4 s, ... at most 30 s) on connection errors and 5xx/408/429 answers, and a tokenizer
that differs from the student's stops the run before training starts.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from tropd.batch import TokenBatch
from tropd.rollout.engine import Generation, SamplingParams, per_prompt

TOKEN_ENV = "TROPD_TEACHER_TOKEN"
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}
PROBE = "The teacher and the student must share one tokenizer: 0123456789 +-*/=()"


class TeacherServerError(ValueError):
    """The teacher server failed or disagrees with the run; the message is one line."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token strings and ids)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def answer_bytes(top_k: int, entropy: bool) -> int:
    """Bytes of a `/v1/score` answer per scored position: the log-prob, the top-k ids
    (int32) and log-probs, the entropy."""
    return 4 + 8 * top_k + 4 * entropy


def read_token_file(path: str, what: str) -> str:
    """The bearer token in the file at `path` (surrounding whitespace removed); `what`
    names the setting in the one-line error for a missing, unreadable or empty file."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path}: cannot read the token ({err})") from None
    if not token:
        raise ValueError(f"{what} {path}: the file is empty; write the token into it")
    return token


def client_token(settings) -> str | None:
    """The bearer token for `teacher.url`: `teacher.token`, else the file
    `teacher.token_file`, else `$TROPD_TEACHER_TOKEN` (None: no token)."""
    if settings.token:
        return settings.token.get_secret_value()
    if settings.token_file:
        return read_token_file(settings.token_file, "teacher.token_file")
    return os.environ.get(TOKEN_ENV) or None


def connect_teacher(settings, model_name: str, tokenizer) -> TropdTeacher | OpenAITeacher:
    """The client `settings` (the `teacher` config section) describe, checked against the
    student's tokenizer and `settings.top_k`. `model_name` names the served model for the
    OpenAI API."""
    token = client_token(settings)
    common = {"token": token, "timeout_s": settings.timeout_s, "retries": settings.retries}
    if settings.api == "openai":
        client = OpenAITeacher(settings.url, model_name, **common)
    else:
        client = TropdTeacher(settings.url, **common)
    client.check(tokenizer, settings.top_k)
    return client


class RemoteTeacher:
    """A teacher server: HTTP with a bearer token, a timeout and retries with backoff.
    Subclasses add `check`, `score_batch` and `generate` for their protocol."""

    def __init__(self, url: str, token: str | None, timeout_s: float, retries: int):
        self.url, self.token = url.rstrip("/"), token
        self.timeout_s, self.retries = timeout_s, retries

    def call(self, path: str, payload: dict[str, Any] | None = None) -> bytes:
        """GET `path` (no payload) or POST `payload` as JSON; returns the response body."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        where = f"teacher.url {self.url}{path}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = _detail(err)
                if err.code == 401:
                    raise TeacherServerError(
                        f"{where}: the server refused the token (HTTP 401); set "
                        f"${TOKEN_ENV} (or teacher.token_file, teacher.token) to the server's "
                        "token"
                    ) from None
                if err.code not in RETRIED_STATUS or attempt == self.retries:
                    raise TeacherServerError(f"{where}: HTTP {err.code}: {detail}") from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = str(getattr(err, "reason", err))
                if attempt == self.retries:
                    raise TeacherServerError(
                        f"{where}: no answer after {attempt + 1} tries ({reason}); is the "
                        "server running? (teacher.timeout_s, teacher.retries)"
                    ) from None
            time.sleep(min(2.0**attempt, 30.0))
        raise AssertionError("unreachable")

    def call_json(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        return json.loads(self.call(path, payload))


def _detail(err: urllib.error.HTTPError) -> str:
    body = err.read().decode(errors="replace")
    try:
        return str(json.loads(body).get("detail") or json.loads(body).get("message") or body)
    except (json.JSONDecodeError, AttributeError):
        return body[:500]


def _response_spans(batch: TokenBatch) -> tuple[list[list[int]], list[int]]:
    """Each row's real tokens and where its response starts. Responses are one run of
    positions from there to the row's end (prompt, teacher prefix, student part)."""
    rows, starts = [], []
    for i in range(len(batch)):
        length = int(batch.attention_mask[i].sum())
        response = batch.response_mask[i, :length].nonzero().flatten()
        start = int(response[0]) if response.numel() else length
        if response.numel() != length - start:
            raise ValueError("remote scoring needs each row's response to run to its end")
        rows.append(batch.tokens[i, :length].tolist())
        starts.append(start)
    return rows, starts


def _scatter(batch: TokenBatch, values: dict[str, torch.Tensor | None]) -> TokenBatch:
    """Place per-position values (row-major over response positions) into `[B, T(, K)]`;
    a None value (a statistic not asked for) sets its field to None."""
    rows, cols = batch.response_mask.nonzero(as_tuple=True)
    out = {}
    for name, flat in values.items():
        if flat is None:
            out[name] = None
            continue
        full = torch.zeros(*batch.tokens.shape, *flat.shape[1:], dtype=flat.dtype)
        full[rows, cols] = flat
        out[name] = full.to(batch.tokens.device)
    return batch.replace(**out)


class TropdTeacher(RemoteTeacher):
    """Client of `tropd serve-teacher`."""

    def info(self) -> dict[str, Any]:
        """The server's model, tokenizer hash and limits (fetched once)."""
        if not hasattr(self, "_info"):
            self._info = self.call_json("/v1/info")
        return self._info

    def check(self, tokenizer, top_k: int) -> None:
        """Stop with one line when the server's tokenizer or vocabulary is not the
        student's, or it cannot return `top_k` log-probs."""
        info = self.info()
        mine = tokenizer_fingerprint(tokenizer)
        if info["tokenizer"] != mine:
            raise TeacherServerError(
                f"teacher.url: the server's model {info['model']!r} uses another tokenizer "
                f"(vocabulary hash {info['tokenizer']}, the student's {mine}); on-policy "
                "distillation needs a shared tokenizer"
            )
        if top_k > info["max_top_k"]:
            raise TeacherServerError(
                f"teacher.top_k: {top_k} exceeds the server's limit {info['max_top_k']}; "
                f"set teacher.top_k <= {info['max_top_k']} or restart it with --max-top-k"
            )

    def score_batch(self, batch: TokenBatch, top_k: int, entropy: bool = True) -> TokenBatch:
        """The teacher's view of every response token, as `tropd.teacher.score_batch`:
        the server computes and sends the top-k only for `top_k > 0` and the entropy only
        when `entropy`."""
        rows, starts = _response_spans(batch)
        info = self.info()
        budget = info["max_request_tokens"]
        if "max_answer_bytes" in info:  # the answer's bytes per token bound the tokens too
            budget = min(budget, info["max_answer_bytes"] // answer_bytes(top_k, entropy))
        asked = {"top_k": top_k, "entropy": entropy}
        parts = []
        for part in _requests([len(row) for row in rows], budget):
            payload = {"sequences": rows[part], "response_start": starts[part]}
            parts.append(load_tensors(self.call("/v1/score", {**payload, **asked})))
        values = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return _scatter(
            batch,
            {
                "teacher_logprobs": values["logprobs"],
                "teacher_topk_ids": values["topk_ids"].long() if top_k else None,
                "teacher_topk_logprobs": values["topk_logprobs"] if top_k else None,
                "teacher_entropy": values["entropy"] if entropy else None,
            },
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        """Teacher samples (guidance prefixes); the `Engine` interface."""
        if not prompts:
            return []
        per_row = per_prompt(params, len(prompts))
        info = self.info()
        asked = max(p.max_new_tokens for p in per_row)
        if asked > info.get("max_new_tokens", asked):
            raise TeacherServerError(
                f"teacher.url: the server generates at most {info['max_new_tokens']} new "
                f"tokens per prompt, the run asks for {asked}; restart it with "
                f"--max-new-tokens {asked}"
            )
        costs = [len(prompt) + p.max_new_tokens for prompt, p in zip(prompts, per_row, strict=True)]
        generations = []
        for part in _requests(costs, info["max_request_tokens"]):
            answer = self.call_json(
                "/v1/generate",
                {
                    "prompts": prompts[part],
                    "max_new_tokens": [p.max_new_tokens for p in per_row[part]],
                    "temperature": per_row[0].temperature,
                    "top_p": per_row[0].top_p,
                    "seed": int(torch.randint(2**31, ())),
                },
            )
            generations += [Generation(g["tokens"], g["logprobs"], g["finished"]) for g in answer]
        return generations


def _requests(costs: list[int], budget: int) -> list[slice]:
    """Consecutive rows grouped into requests of at most `budget` tokens (`costs` per
    row; a row over the budget goes alone, for the server to refuse with its reason)."""
    parts, begin = [], 0
    while begin < len(costs):
        end, size = begin, 0
        while end < len(costs) and (end == begin or size + costs[end] <= budget):
            size, end = size + costs[end], end + 1
        parts.append(slice(begin, end))
        begin = end
    return parts


class OpenAITeacher(RemoteTeacher):
    """Client of an OpenAI-compatible completion server with vLLM's `prompt_logprobs`."""

    def __init__(self, url: str, model: str, **client: Any):
        super().__init__(url, **client)
        self.model = model

    def check(self, tokenizer, top_k: int) -> None:
        """Compare the server's tokenization of a probe text with the student's (vLLM's
        `/tokenize`); a server without it is trusted and checked by id range later."""
        self.vocab_size = len(tokenizer)
        try:
            served = self.call_json(
                "/tokenize", {"model": self.model, "prompt": PROBE, "add_special_tokens": False}
            )["tokens"]
        except TeacherServerError as err:
            if "HTTP 404" not in str(err):
                raise
            return
        mine = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        if served != mine:
            raise TeacherServerError(
                f"teacher.url: the server's model {self.model!r} tokenizes differently from "
                "the student; on-policy distillation needs a shared tokenizer"
            )

    def score_batch(self, batch: TokenBatch, top_k: int, entropy: bool = True) -> TokenBatch:
        """The teacher's view of every response token from vLLM's prompt log-probs: the
        top `top_k` per position are asked for only when `top_k > 0`; the entropy (when
        `entropy`) is the lower bound from them."""
        rows, starts = _response_spans(batch)
        answer = self.call_json(
            "/v1/completions",
            {"model": self.model, "prompt": rows, "max_tokens": 1, "prompt_logprobs": top_k},
        )
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        token_lp, top_ids, top_lp, entropies = [], [], [], []
        for row, start, choice in zip(rows, starts, choices, strict=True):
            for t in range(start, len(row)):
                offered = {int(i): e for i, e in choice["prompt_logprobs"][t].items()}
                ranked = sorted(
                    (e["logprob"], i) for i, e in offered.items() if e.get("rank", 1) <= top_k
                )[::-1]
                if len(ranked) < top_k:
                    raise TeacherServerError(
                        f"teacher.top_k: the server returned {len(ranked)} log-probs per "
                        f"position, not {top_k}; start vLLM with --max-logprobs {top_k}"
                    )
                if max(offered) >= self.vocab_size:
                    raise TeacherServerError(
                        "teacher.url: the server returned token ids beyond the student's "
                        "vocabulary; on-policy distillation needs a shared tokenizer"
                    )
                values = torch.tensor([lp for lp, _ in ranked[:top_k]], dtype=torch.float64)
                probs = values.exp()
                rest = (1 - probs.sum()).clamp(min=0)
                token_lp.append(offered[row[t]]["logprob"])
                top_ids.append([i for _, i in ranked[:top_k]])
                top_lp.append(values.tolist())
                entropies.append(
                    float(-(probs * values).sum() - rest * rest.clamp(min=1e-30).log())
                )
        return _scatter(
            batch,
            {
                "teacher_logprobs": torch.tensor(token_lp),
                "teacher_topk_ids": (
                    torch.tensor(top_ids, dtype=torch.long).view(-1, top_k) if top_k else None
                ),
                "teacher_topk_logprobs": torch.tensor(top_lp).view(-1, top_k) if top_k else None,
                "teacher_entropy": torch.tensor(entropies) if entropy else None,
            },
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        per_row = per_prompt(params, len(prompts))
        results: list[Generation | None] = [None] * len(prompts)
        for budget in sorted({p.max_new_tokens for p in per_row}):
            picked = [i for i, p in enumerate(per_row) if p.max_new_tokens == budget]
            answer = self.call_json(
                "/v1/completions",
                {
                    "model": self.model,
                    "prompt": [prompts[i] for i in picked],
                    "max_tokens": budget,
                    "temperature": per_row[0].temperature,
                    "top_p": per_row[0].top_p,
                    "logprobs": 0,
                    "return_token_ids": True,
                },
            )
            for choice in answer["choices"]:
                tokens = choice["token_ids"]
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
                results[picked[choice["index"]]] = Generation(
                    tokens, logprobs[: len(tokens)], choice["finish_reason"] == "stop"
                )
        return results
