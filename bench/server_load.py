"""Latency of small requests to `tropd serve-teacher` while another client sends large ones.

The teacher server cuts every request into chunks of at most `--chunk-tokens` padded tokens
and runs one chunk per forward pass, the waiting requests in turn (new ones first). This
measures what that buys a small request queued behind a large one, against the same
server with chunks as large as the large request (one pass for all of it, as before
chunking).

Setup. A random-weight Llama teacher (hidden 128, 4 layers, 4 heads, intermediate 512,
1024 positions, the `add` task's 16-token character vocabulary), saved to a temporary
folder and served on loopback by `python -m tropd serve-teacher` in its own process
(`OMP_NUM_THREADS=--threads`, the token in `$TROPD_TEACHER_TOKEN`). Requests ask for
`top_k=8` and the entropy.

- small request: 1 sequence of 16 tokens (15 scored positions);
- one-chunk request: 8 sequences of 1024 tokens (8192 tokens, one pass at the default
  `--chunk-tokens 8192` here);
- large request: 128 sequences of 1024 tokens (131,072 tokens: 16 chunks).

Per server setting (`chunked`: `--chunk-tokens 8192`; `one pass`: `--chunk-tokens 131072`),
after two warm-up requests: the latency of 5 one-chunk requests alone (median: the chunk
time), of 30 small requests alone (idle p50/p99), then the load: one client sends
`--large` large requests back to back while `--small-clients` clients each send small
requests back to back until it is done. Reported: p50/p99/max latency of the small
requests sent while a large one was in flight, the large requests' durations, and the
server's peak RSS (`VmHWM` of /proc/PID/status) at the end.

Usage: `python bench/server_load.py` (writes bench/results/server/{results.json,table.md}).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import OFFLINE_ENV, cpu_info, markdown, write_atomic

ROOT = Path(__file__).resolve().parent
TOKEN = "bench-token"
LENGTH = 1024  # tokens per row of the one-chunk and the large requests


def build_teacher(folder: Path) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from tropd.models import tiny_llama_config
    from tropd.tasks import get_task
    from tropd.tasks.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(get_task("add").alphabet)
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), 128, 4, 4, max_position_embeddings=LENGTH)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: bytes | None) -> float:
    """Send one request (GET without a body); its latency in seconds."""
    request = urllib.request.Request(url, data=body)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - start


def score_body(rows: int, length: int) -> bytes:
    sequences = [[3 + (i + t) % 13 for t in range(length)] for i in range(rows)]
    request = {"sequences": sequences, "response_start": [1] * rows, "top_k": 8}
    return json.dumps(request).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(model: str, chunk_tokens: int, args: argparse.Namespace) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "OMP_NUM_THREADS": str(args.threads),
        "TROPD_TEACHER_TOKEN": TOKEN,
    }
    command = [sys.executable, "-m", "tropd", "serve-teacher", model, "--port", str(port)]
    command += ["--chunk-tokens", str(chunk_tokens)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read())
            try:
                post(base + "/v1/info", None)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        url = base + "/v1/score"
        small, one_chunk, large = score_body(1, 16), score_body(8, LENGTH), score_body(128, LENGTH)
        for _ in range(2):
            post(url, one_chunk)
        chunk_time = statistics.median(post(url, one_chunk) for _ in range(5))
        idle = [post(url, small) for _ in range(30)]

        spans: list[tuple[float, float]] = []
        small_spans: list[tuple[float, float]] = []
        finished = threading.Event()

        def timed(body: bytes, into: list) -> None:
            start = time.perf_counter()
            into.append((start, start + post(url, body)))

        def large_client() -> None:
            for _ in range(args.large):
                timed(large, spans)
            finished.set()

        def small_client() -> None:
            while not finished.is_set():
                timed(small, small_spans)

        threads = [threading.Thread(target=large_client)]
        threads += [threading.Thread(target=small_client) for _ in range(args.small_clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    during = [e - s for s, e in small_spans if any(a <= s < b for a, b in spans)]
    return {
        "chunk_tokens": chunk_tokens,
        "chunk_time_s": chunk_time,
        "idle_p50_s": percentile(idle, 0.5),
        "idle_p99_s": percentile(idle, 0.99),
        "small_under_load": len(during),
        "small_p50_s": percentile(during, 0.5),
        "small_p99_s": percentile(during, 0.99),
        "small_max_s": max(during),
        "large_s": [b - a for a, b in spans],
        "server_peak_rss_mb": int(peak.split()[1]) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--large", type=int, default=2, help="large requests in the load")
    parser.add_argument("--small-clients", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "server"))
    args = parser.parse_args()
    settings = {"chunked": 8 * LENGTH, "one pass": 128 * LENGTH}
    with tempfile.TemporaryDirectory() as folder:
        model = build_teacher(Path(folder) / "teacher")
        results = {name: measure(model, chunk, args) for name, chunk in settings.items()}
    command = "python bench/server_load.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    record = {"command": command.strip(), "machine": cpu_info(), "results": results}
    write_atomic(out / "results.json", json.dumps(record, indent=1))
    ms = lambda seconds: f"{seconds * 1e3:.0f}"  # noqa: E731
    rows = [
        [
            f"{name} (`--chunk-tokens {r['chunk_tokens']}`)",
            ms(r["chunk_time_s"]),
            f"{ms(r['idle_p50_s'])} / {ms(r['idle_p99_s'])}",
            str(r["small_under_load"]),
            f"{ms(r['small_p50_s'])} / {ms(r['small_p99_s'])} / {ms(r['small_max_s'])}",
            ", ".join(f"{s:.1f}" for s in r["large_s"]),
            f"{r['server_peak_rss_mb']:.0f}",
        ]
        for name, r in results.items()
    ]
    head = [
        "server",
        "one-chunk request (ms)",
        "small idle p50 / p99 (ms)",
        "small under load (n)",
        "small under load p50 / p99 / max (ms)",
        "large requests (s)",
        "server peak RSS (MB)",
    ]
    machine = cpu_info()
    text = (
        "# Teacher server: small requests behind large ones\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, Python "
        f"{machine['python']}; server with {args.threads} torch thread(s); "
        f"{args.small_clients} small clients and one large client ({args.large} large "
        "requests of 131,072 tokens, 16 chunks of 8192).\n\n"
        + markdown(head, rows)
        + "\n\nSee the docstring of bench/server_load.py for the method.\n"
    )
    write_atomic(out / "table.md", text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
