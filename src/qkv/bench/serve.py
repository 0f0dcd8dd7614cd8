"""Load on ``qkv serve``'s OpenAI-compatible API: concurrent chat clients for a fixed time, on loopback only.

``serve_load(checkpoint)`` starts ``qkv serve --checkpoint ... --port 0`` as a subprocess bound to 127.0.0.1,
then runs ``clients`` threads (default 16) for ``seconds`` (default 20): each sends streamed
``/v1/chat/completions`` requests one after another (its own conversation, ``max_tokens`` new tokens, sampled at
temperature 0.8 with a seed of its own), reading every chunk. A 503 must carry ``Retry-After``: the client waits
that long and sends again; any other failure counts as an error. Bounded in time (no request starts after the
deadline; each has a timeout) and in count (``max_requests``).

The result: requests answered, 503s, errors (with the first messages), latency p50/p99 (request sent → last
chunk), time to first token p50/p99, completion tokens/s over the run, and the server's resident memory (VmRSS
from ``/proc``) after a warm-up request and at the end, with its growth. ``qkv bench serve --checkpoint PATH``
prints it; nothing here imports the server's code: the server is measured as a user runs it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServeLoad", "serve_load", "format_serve_load", "resident_bytes"]

PROMPTS = ("Tell me a story about a cat.", "What is the capital of France?", "Write a short poem about the sea.",
           "What does attention do?", "Give me three names for a dog.", "How do I boil an egg?",
           "Say hello in French.", "Who wrote Hamlet?")  # short: a tiny model's context holds them and a reply


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (VmRSS) in bytes, from ``/proc`` (None where there is none)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class ServeLoad:
    """What one load run measured (times in seconds, memory in bytes)."""

    checkpoint: str
    model: str
    clients: int
    seconds: float
    max_tokens: int
    elapsed: float = 0.0
    ok: int = 0
    busy: int = 0  # 503 with Retry-After, retried
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    rss_start: int | None = None
    rss_end: int | None = None
    rss_peak: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed else float("nan")

    @property
    def rss_growth(self) -> float | None:
        """(end - start) / start, after the warm-up request."""
        if not self.rss_start or self.rss_end is None:
            return None
        return (self.rss_end - self.rss_start) / self.rss_start

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "model": self.model, "clients": self.clients,
                "seconds": self.seconds, "max_tokens": self.max_tokens, "elapsed": self.elapsed, "ok": self.ok,
                "busy_503": self.busy, "errors": self.errors, "error_messages": self.error_messages,
                "latency_p50": _percentile(self.latencies, 50), "latency_p99": _percentile(self.latencies, 99),
                "first_token_p50": _percentile(self.first_token, 50),
                "first_token_p99": _percentile(self.first_token, 99), "completion_tokens": self.completion_tokens,
                "tokens_per_s": self.tokens_per_s, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "rss_start": self.rss_start, "rss_end": self.rss_end,
                "rss_peak": self.rss_peak, "rss_growth": self.rss_growth}


class _Server:
    """``qkv serve`` in a subprocess on 127.0.0.1 and a free port, with a fresh key."""

    def __init__(self, checkpoint: str, queue_size: int | None, threads: int | None, max_new_tokens: int,
                 timeout: float):
        self.key = secrets.token_hex(16)
        command = [sys.executable, "-m", "qkv", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
                   "--port", "0", "--max-new-tokens", str(max_new_tokens)]
        if queue_size is not None:
            command += ["--queue-size", str(queue_size)]
        if threads is not None:
            command += ["--threads", str(threads)]
        env = {**os.environ, "QKV_API_KEY": self.key}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env)
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", found[0]) if found else None
        if match is None:
            self.stop()
            why = self.process.stderr.read().strip().splitlines()
            raise ValueError(f"qkv serve did not start: {why[-1] if why else 'no address printed'}")
        self.port = int(match.group(1))
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drain what it prints next
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 120.0
                ) -> tuple[int, dict[str, str], http.client.HTTPResponse, http.client.HTTPConnection]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self.key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response, conn

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def _chat(server: _Server, model: str, client: int, turn: int, max_tokens: int, timeout: float) -> dict:
    """One streamed chat request → {status, latency, first_token, usage} or {status, retry_after} or {error}."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0.8, "seed": client * 100_003 + turn,
            "messages": [{"role": "user", "content": PROMPTS[(client + turn) % len(PROMPTS)]}]}
    start = time.perf_counter()
    try:
        status, headers, response, conn = server.request("POST", "/v1/chat/completions", body, timeout)
    except OSError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        if status == 503:
            response.read()
            return {"status": 503, "retry_after": headers.get("retry-after")}
        if status != 200:
            return {"error": f"HTTP {status}: {response.read()[:200].decode(errors='replace')}"}
        first, usage, done = None, None, False
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": f"in the stream: {chunk['error'].get('message')}"}
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                first = time.perf_counter() - start
        if not done or usage is None:
            return {"error": "the stream ended without its usage chunk and data: [DONE]"}
        return {"status": 200, "latency": time.perf_counter() - start, "first_token": first, "usage": usage}
    except (OSError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()


def serve_load(checkpoint: str | Path, *, clients: int = 16, seconds: float = 20.0, max_tokens: int = 32,
               queue_size: int | None = None, threads: int | None = None, max_requests: int = 100_000,
               timeout: float = 120.0, progress: bool = False) -> ServeLoad:
    """Run ``clients`` streamed chat clients against ``qkv serve --checkpoint checkpoint`` for ``seconds``
    (see the module's docstring). ``queue_size``, ``threads``: the server's ``--queue-size`` and ``--threads``
    (None: its defaults)."""
    if clients < 1 or seconds <= 0 or max_tokens < 1 or max_requests < 1:
        raise ValueError(f"clients={clients}, seconds={seconds}, max_tokens={max_tokens} and max_requests="
                         f"{max_requests} must all be positive")
    server = _Server(str(checkpoint), queue_size, threads, max_tokens, timeout)
    try:
        deadline = time.monotonic() + timeout
        while True:  # ready: /health answers 200
            try:
                status, _, response, conn = server.request("GET", "/health", timeout=5)
                response.read()
                conn.close()
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.process.poll() is not None:
                raise ValueError("qkv serve did not become ready (GET /health); run it by hand to see why")
            time.sleep(0.1)
        status, _, response, conn = server.request("GET", "/v1/models")
        model = json.loads(response.read())["data"][0]["id"]
        conn.close()
        result = ServeLoad(str(checkpoint), model, clients, seconds, max_tokens)
        warm = _chat(server, model, 0, 0, max_tokens, timeout)  # first-request costs out of the figures
        if "error" in warm:
            raise ValueError(f"the warm-up request failed: {warm['error']}")
        result.rss_start = result.rss_peak = resident_bytes(server.process.pid)

        lock, sent = threading.Lock(), [0]
        stop_at = time.monotonic() + seconds

        def client(index: int) -> None:
            turn = 0
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                answer = _chat(server, model, index, turn, max_tokens, timeout)
                turn += 1
                with lock:
                    if "error" in answer:
                        result.errors += 1
                        if len(result.error_messages) < 5:
                            result.error_messages.append(answer["error"])
                    elif answer["status"] == 503:
                        if not answer["retry_after"]:
                            result.errors += 1
                            if len(result.error_messages) < 5:
                                result.error_messages.append("503 without Retry-After")
                            continue
                        result.busy += 1
                    else:
                        result.ok += 1
                        result.latencies.append(answer["latency"])
                        if answer["first_token"] is not None:
                            result.first_token.append(answer["first_token"])
                        usage = answer["usage"]
                        result.completion_tokens += usage["completion_tokens"]
                        result.prompt_tokens += usage["prompt_tokens"]
                        result.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                if "retry_after" in answer and answer["retry_after"]:
                    time.sleep(min(float(answer["retry_after"]), max(0.0, stop_at - time.monotonic())))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss = resident_bytes(server.process.pid)
            if rss is not None and result.rss_peak is not None:
                result.rss_peak = max(result.rss_peak, rss)
            if progress and sys.stderr.isatty():
                print(f"\r{time.perf_counter() - started:5.1f} s: {result.ok} answered, {result.busy} busy, "
                      f"{result.errors} errors", end="", file=sys.stderr, flush=True)
            for t in threads:
                t.join(0.25)
        result.elapsed = time.perf_counter() - started
        if progress and sys.stderr.isatty():
            print(file=sys.stderr, flush=True)
        result.rss_end = resident_bytes(server.process.pid)
        return result
    finally:
        server.stop()


def format_serve_load(result: ServeLoad) -> str:
    """The run as the lines ``qkv bench serve`` prints."""
    d = result.to_dict()
    mib = 1024 * 1024
    lines = [f"qkv serve under load: {d['model']} ({d['checkpoint']})",
             f"{d['clients']} streaming chat clients for {d['seconds']:g} s on 127.0.0.1, max_tokens {d['max_tokens']}"
             f", temperature 0.8; the run took {d['elapsed']:.1f} s",
             f"answered {d['ok']}, 503 with Retry-After {d['busy_503']}, errors {d['errors']}",
             f"latency (request → last chunk) p50 {d['latency_p50']:.3f} s, p99 {d['latency_p99']:.3f} s; first token "
             f"p50 {d['first_token_p50']:.3f} s, p99 {d['first_token_p99']:.3f} s",
             f"completion tokens {d['completion_tokens']}: {d['tokens_per_s']:.1f} tokens/s; prompt tokens "
             f"{d['prompt_tokens']}, of them from the cache {d['cached_tokens']}"]
    if d["rss_start"] is not None and d["rss_end"] is not None:
        lines.append(f"server resident memory: {d['rss_start'] / mib:.1f} MiB after the warm-up, "
                     f"{d['rss_end'] / mib:.1f} MiB at the end (peak {d['rss_peak'] / mib:.1f} MiB): growth "
                     f"{100 * d['rss_growth']:+.1f}%")
    for message in d["error_messages"]:
        lines.append(f"error: {message}")
    return "\n".join(lines)
