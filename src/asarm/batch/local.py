"""Run batch requests through the server's own app, in this process, on its engine loop.

Each request is an HTTP request handed straight to the ASGI app that ``asarm serve`` runs
(``asarm.serve.app.create_app``): the same schemas, the same markup reading and hole-length
planning, the same engine loop with continuous batching up to ``max_batch`` rows, the same answer.
So a body and seed give the same output in the server, in ``asarm batch`` and on Ray, by
construction: there is one request path, with no socket in front of it here.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from .format import BatchRequest, output_line

# A batch has no client to wait for: a request may take as long as the queue in front of it.
BATCH_REQUEST_TIMEOUT = 24 * 3600.0


class AppRunner:
    """The server's app with its engine loop running, called in-process.

    ``await runner.call(url, body)`` -> (status code, JSON body), exactly what the server
    would answer over HTTP. ``close()`` stops the engine loop."""

    def __init__(self, model, *, model_name: str = "asarm", max_batch: int = 32,
                 request_timeout: float = BATCH_REQUEST_TIMEOUT, admit_wave: int | None = None):
        from ..serve.app import create_app

        self.max_batch = max_batch
        # every queued request waits its turn: the concurrency of ``run_requests`` bounds the queue.
        # Newcomers join in waves (default: a whole batch): a batch wants throughput, not latency,
        # and rows that start together share the pass that lays out their visible tokens (ROCStories,
        # 32 rows: 3.0x the requests per CPU-second of one at a time in waves of 32, 1.8x joining
        # one by one; results/batch-cpu/)
        wave = admit_wave if admit_wave is not None else max_batch
        self.app = create_app(model, model_name=model_name, max_batch=max_batch, max_queue=1_000_000,
                              request_timeout=request_timeout, admit_wave=wave)
        self.state = self.app.state.asarm
        self.state.loop.start()
        self._closed = False

    async def call(self, url: str, body: dict) -> tuple[int, dict]:
        payload = json.dumps(body).encode()
        finished = asyncio.Event()
        sent = False
        status, chunks = [500], []

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await finished.wait()  # the "client" stays connected until the answer is complete
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": url, "raw_path": url.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 0), "server": ("asarm-batch", 0)}
        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - the app has answered 500 (and logged it) before re-raising
            status[0] = 500
        finally:
            finished.set()
        raw = b"".join(chunks)
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = {"error": {"message": raw.decode("utf-8", "replace")[:200], "type": "server_error",
                                "param": None, "code": None}}
        return status[0], answer

    async def run(self, request: BatchRequest) -> dict:
        """One request's output line (a bad line's error line without running anything)."""
        if request.error is not None:
            return output_line(request.custom_id, None, None, request.error)
        body = dict(request.body)
        body.pop("stream", None)  # a batch answers whole: streaming is a transport, not an output
        status, answer = await self.call(request.url, body)
        return output_line(request.custom_id, status, answer)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.state.loop.stop()
            self.state.workers.shutdown(wait=False, cancel_futures=True)


_HOLE_LENGTHS = re.compile(r"\[MASK(?::\s*(\d+)\s*(?:-\s*(\d+)\s*)?)?\]")


def generation_hint(request: BatchRequest) -> int:
    """About how many tokens a request generates, read from its body without a tokenizer: a
    completion's ``hole_length`` (else ``max_tokens``), an infill text's ``[MASK:n]`` /
    ``[MASK:a-b]`` holes (the middle of the range; 0 for ``[MASK]``), times ``n``. Only an order."""
    body = request.body if isinstance(request.body, dict) else {}
    try:
        choices = max(1, int(body.get("n") or 1))
        if request.url == "/v1/completions":
            return int(body.get("hole_length") or body.get("max_tokens") or 16) * choices
        if request.url == "/v1/infill" and isinstance(body.get("text"), str):
            return choices * sum((int(a) + int(b or a)) // 2 for a, b in _HOLE_LENGTHS.findall(body["text"]) if a)
    except (TypeError, ValueError):
        pass
    return 0


def by_generation(requests: list[BatchRequest]) -> list[BatchRequest]:
    """Requests with the most tokens to generate first (stable): requests admitted in one wave
    then take similar numbers of rounds and finish together, instead of a few long ones running
    passes nearly alone while the next wave waits (length bucketing; results/batch-cpu/)."""
    return sorted(requests, key=lambda r: -generation_hint(r))


def generated_tokens(line: dict) -> int:
    """Tokens a successful output line generated (0 for errors and scores)."""
    response = line.get("response") or {}
    body = response.get("body") or {}
    usage = body.get("usage") if isinstance(body, dict) else None
    return int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0


async def run_requests(runner: AppRunner, requests: list[BatchRequest], on_line, concurrency: int | None = None):
    """Run ``requests`` with up to ``concurrency`` in flight (default: twice the batch, so the
    next requests are parsed and planned while the engine runs the current ones); call
    ``on_line(line)`` for each output line as it finishes (completion order, as OpenAI's)."""
    limit = asyncio.Semaphore(concurrency or 2 * runner.max_batch)

    async def one(request):
        async with limit:
            line = await runner.run(request)
        on_line(line)

    await asyncio.gather(*(one(r) for r in requests))


def run_lines(runner: AppRunner, requests: list[BatchRequest]) -> list[dict]:
    """Every request's output line, in the order of ``requests`` (the Ray actors' call)."""
    out = {}

    def keep(line):
        out[line["custom_id"]] = line

    asyncio.run(run_requests(runner, requests, keep))
    return [out[r.custom_id] for r in requests]


class Progress:
    """Counts for the progress bar and the summary: requests done and failed, tokens generated."""

    def __init__(self, total: int, skipped: int, enabled: bool = True):
        self.total, self.skipped = total, skipped
        self.ok = self.failed = self.tokens = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", dynamic_ncols=True, smoothing=0.1)

    def update(self, line: dict) -> None:
        if line.get("error") is None:
            self.ok += 1
        else:
            self.failed += 1
        self.tokens += generated_tokens(line)
        if self.bar is not None:
            self.bar.update(1)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s, {self.failed} failed", refresh=False)

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.start
        done = self.ok + self.failed
        return {"requests": done, "ok": self.ok, "failed": self.failed, "skipped": self.skipped,
                "tokens": self.tokens, "seconds": round(elapsed, 3),
                "requests_per_s": round(done / max(elapsed, 1e-9), 3),
                "tokens_per_s": round(self.tokens / max(elapsed, 1e-9), 2)}
