"""`tropd serve-teacher` and its client: the same scores as the local teacher, the same
training run, authentication, request limits, and retries through a restart."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd.config import load_config
from tropd.model_names import load_model, load_tokenizer
from tropd.rollout import HFEngine, SamplingParams, collect_rollouts
from tropd.tasks.tokenizer import build_char_tokenizer
from tropd.teacher import score_batch
from tropd.teacher.remote import TeacherServerError, TropdTeacher
from tropd.train import loop

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "test-token"
FIELDS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_entropy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, port: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tropd", "serve-teacher", model, "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TROPD_TEACHER_TOKEN": TOKEN}
    return subprocess.Popen([*command, *flags], env=env, stderr=subprocess.PIPE, text=True)


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            post(url + "/v1/info", None, TOKEN)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError("the teacher server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def post(url: str, body: bytes | None, token: str | None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, headers=headers or {})
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def status_of(url: str, body: bytes | None, token: str | None = TOKEN) -> tuple[int, str]:
    try:
        return post(url, body, token)[0], ""
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["detail"]


@pytest.fixture(scope="module")
def server(tiny_pair):
    """A teacher server on loopback with a token and a small body limit (0.05 MB)."""
    port = free_port()
    proc = start_server(tiny_pair[0], port, "--max-body-mb", "0.05")
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, proc)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def rollout_batch(tiny_pair):
    student = load_model(tiny_pair[1], "float32", "cpu")
    tokenizer = load_tokenizer(tiny_pair[1])
    torch.manual_seed(0)
    engine = HFEngine(student, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 4, 4, 4, 4, 5]]
    return collect_rollouts(engine, prompts, SamplingParams(8), 3, tokenizer.pad_token_id)


def client(url: str, tiny_pair, **kwargs) -> TropdTeacher:
    remote = TropdTeacher(url, **{"token": TOKEN, "timeout_s": 30, "retries": 0, **kwargs})
    remote.check(load_tokenizer(tiny_pair[1]), 8)
    return remote


def assert_same_scores(local, remote) -> None:
    for name in FIELDS:
        a, b = getattr(local, name), getattr(remote, name)
        if a is None:  # a statistic not asked for
            assert b is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_server_scores_like_the_local_teacher(server, tiny_pair, rollout_batch):
    local = score_batch(load_model(tiny_pair[0], "float32", "cpu"), rollout_batch, 8)
    assert_same_scores(local, client(server, tiny_pair).score_batch(rollout_batch, 8))


def test_concurrent_requests_are_answered_each_with_its_own_scores(
    server, tiny_pair, rollout_batch
):
    teacher = load_model(tiny_pair[0], "float32", "cpu")
    remote = client(server, tiny_pair)
    parts = [rollout_batch.select(slice(i, i + 2)).trim() for i in range(0, 9, 2)]
    top_ks = [2, 8, 4, 8, 1]
    with ThreadPoolExecutor(len(parts)) as pool:
        answers = list(pool.map(remote.score_batch, parts, top_ks))
    for part, top_k, answer in zip(parts, top_ks, answers, strict=True):
        assert_same_scores(score_batch(teacher, part, top_k), answer)


@pytest.mark.parametrize(("top_k", "entropy"), [(0, False), (8, False), (0, True), (8, True)])
def test_server_computes_and_sends_only_the_statistics_asked_for(
    server, tiny_pair, rollout_batch, top_k: int, entropy: bool
):
    local = score_batch(
        load_model(tiny_pair[0], "float32", "cpu"), rollout_batch, top_k, 1024, entropy
    )
    remote = client(server, tiny_pair).score_batch(rollout_batch, top_k, entropy)
    assert (remote.teacher_topk_ids is None) == (top_k == 0)
    assert (remote.teacher_entropy is None) == (not entropy)
    assert_same_scores(local, remote)


def test_merged_requests_asking_for_different_statistics(server, tiny_pair, rollout_batch):
    teacher = load_model(tiny_pair[0], "float32", "cpu")
    remote = client(server, tiny_pair)
    parts = [rollout_batch.select(slice(i, i + 3)).trim() for i in range(0, 9, 3)]
    asked = [(0, False), (8, True), (4, False)]
    with ThreadPoolExecutor(len(parts)) as pool:
        answers = list(pool.map(lambda p, a: remote.score_batch(p, *a), parts, asked))
    for part, (top_k, entropy), answer in zip(parts, asked, answers, strict=True):
        assert_same_scores(score_batch(teacher, part, top_k, 1024, entropy), answer)


def test_wrong_or_missing_token_is_401(server, tiny_pair):
    assert status_of(server + "/v1/info", None, token="wrong")[0] == 401
    assert status_of(server + "/v1/info", None, token=None)[0] == 401
    with pytest.raises(TeacherServerError, match="refused the token"):
        TropdTeacher(server, token="wrong", timeout_s=30, retries=0).info()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 422, "body"),
        (b'{"sequences": [[1, 2]], "top_k": 2}', 422, "response_start"),
        (b'{"sequences": [[1, 2]], "response_start": [1], "top_k": 2, "x": 1}', 422, "x"),
        (b'{"sequences": [[1, 999]], "response_start": [1], "top_k": 2}', 422, "token ids"),
        (b'{"sequences": [[1, 2]], "response_start": [0], "top_k": 2}', 422, "response_start"),
        (b'{"sequences": [[1, 2]], "response_start": [1], "top_k": 99}', 422, "top_k"),
        (b'{"sequences": [[1, 2]], "response_start": [1], "top_k": -1}', 422, "top_k"),
        (
            b'{"sequences": [[1, 2]], "response_start": [1], "top_k": 2, "entropy": 3}',
            422,
            "entropy",
        ),
        (
            json.dumps({"sequences": [[1] * 300], "response_start": [1], "top_k": 2}).encode(),
            422,
            "limit is 256",
        ),
        (
            json.dumps({"sequences": [[1] * 30000], "response_start": [1], "top_k": 2}).encode(),
            413,
            "body over the limit",
        ),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(
    server, tiny_pair, rollout_batch, body, status, message
):
    code, detail = status_of(server + "/v1/score", body)
    assert code == status and message in detail, detail
    ok = post(
        server + "/v1/score",
        b'{"sequences": [[1, 5, 6]], "response_start": [1], "top_k": 2}',
        TOKEN,
    )
    assert ok[0] == 200


def test_another_tokenizer_is_refused_with_one_line(server, tiny_pair):
    remote = TropdTeacher(server, token=TOKEN, timeout_s=30, retries=0)
    with pytest.raises(TeacherServerError, match="another tokenizer"):
        remote.check(build_char_tokenizer("xyz"), 8)
    with pytest.raises(TeacherServerError, match=r"teacher\.top_k"):
        remote.check(load_tokenizer(tiny_pair[1]), 10_000)


def test_listening_beyond_loopback_needs_a_token():
    from tropd.teacher.server import check_binding, serve

    with pytest.raises(ValueError, match="--token"):
        serve(None, None, "unused", host="0.0.0.0", token=None)
    with pytest.raises(ValueError, match="--token"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", TOKEN)
    check_binding("127.0.0.1", None)


def test_client_retries_through_a_server_restart(tiny_pair, rollout_batch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_server(tiny_pair[0], port)
    wait_until_up(url, first)
    remote = client(url, tiny_pair, retries=6)
    expected = remote.score_batch(rollout_batch, 8)
    stop(first)
    restarted: list[subprocess.Popen] = []
    timer = threading.Timer(1.0, lambda: restarted.append(start_server(tiny_pair[0], port)))
    timer.start()
    try:
        assert_same_scores(expected, remote.score_batch(rollout_batch, 8))
    finally:
        timer.join()
        for proc in restarted:
            stop(proc)


def test_training_with_the_server_matches_the_local_teacher(server, tiny_pair, tmp_path):
    def run(name: str, *extra: str) -> Path:
        config = load_config(
            None,
            [
                f"model.teacher={tiny_pair[0]}",
                f"model.student={tiny_pair[1]}",
                f"run.output_dir={tmp_path / name}",
                "run.steps=3",
                "run.save_every=0",
                "run.progress=false",
                "rollout.prompts_per_step=4",
                "rollout.samples_per_prompt=2",
                "rollout.max_new_tokens=6",
                "teacher.top_k=8",
                "eval.every=3",
                "eval.num_prompts=8",
                "optim.lr=1e-2",
                "guidance.enabled=false",
                *extra,
            ],
        )
        return loop.train(config)

    local = run("local")
    remote = run("remote", f"teacher.url={server}", f"teacher.token={TOKEN}")
    expected = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [0, 1, 2, 3]
    for a, b in zip(expected, got, strict=True):
        assert "eval/reverse_kl" not in b  # needs the teacher's full distributions
        for key in {k for k in a if not k.startswith("time_")} - {"eval/reverse_kl"}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    weights_a = AutoModelForCausalLM.from_pretrained(local / "final").state_dict()
    weights_b = AutoModelForCausalLM.from_pretrained(remote / "final").state_dict()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights_b[name], tensor, rtol=0, atol=1e-6)


def test_openai_client_reads_vllm_prompt_logprobs(tiny_pair, rollout_batch, monkeypatch):
    """The OpenAI-compatible client against answers shaped like vLLM's `prompt_logprobs`
    (top-k entries plus the actual token with its rank; at most 8, like vLLM's
    `--max-logprobs`), built from the local teacher."""
    from tropd.teacher.remote import OpenAITeacher

    teacher = load_model(tiny_pair[0], "float32", "cpu")
    tokenizer = load_tokenizer(tiny_pair[1])

    def fake_vllm(self, path, payload):
        if path == "/tokenize":
            return {"tokens": tokenizer(payload["prompt"], add_special_tokens=False)["input_ids"]}
        choices = []
        for index, row in enumerate(payload["prompt"]):
            logits = teacher(input_ids=torch.tensor([row])).logits[0].float().detach()
            logprobs = torch.log_softmax(logits, -1)
            entries = [None]
            for t in range(1, len(row)):
                ranked = logprobs[t - 1].argsort(descending=True).tolist()
                keep = [*ranked[: min(payload["prompt_logprobs"], 8)], row[t]]  # cap 8
                entries.append(
                    {
                        str(i): {"logprob": float(logprobs[t - 1, i]), "rank": ranked.index(i) + 1}
                        for i in keep
                    }
                )
            choices.append({"index": index, "prompt_logprobs": entries})
        return {"choices": choices}

    monkeypatch.setattr(OpenAITeacher, "call_json", fake_vllm)
    remote = OpenAITeacher("http://unused", "teacher", token=None, timeout_s=1, retries=0)
    remote.check(tokenizer, 8)
    got = remote.score_batch(rollout_batch, 8)
    expected = score_batch(teacher, rollout_batch, 8)
    for name in ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0)
    assert (got.teacher_entropy <= expected.teacher_entropy + 1e-5).all()  # a lower bound
    with pytest.raises(TeacherServerError, match="--max-logprobs 12"):
        remote.score_batch(rollout_batch, 12)
    lean = remote.score_batch(rollout_batch, 0, entropy=False)  # what OPD reads
    torch.testing.assert_close(lean.teacher_logprobs, expected.teacher_logprobs, atol=1e-5, rtol=0)
    assert lean.teacher_topk_ids is None and lean.teacher_entropy is None
