"""`asarm serve` as a real process: it starts, answers, and on SIGTERM stops accepting, finishes
the request in flight and exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_util import sse_events  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*options: str) -> tuple[subprocess.Popen, str]:
    """`asarm serve` on a free port, once /health answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "asarm.cli", "serve", "--port", str(port), "--threads", "1",
                             "--log-level", "warning", *options],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start")
        time.sleep(0.2)


def test_sigterm_finishes_in_flight_and_exits_0():
    proc, url = start_server("--max-batch", "4", "--grace", "30", "--pass-delay", "0.05")
    try:
        result = {}
        first_token = threading.Event()

        def in_flight():  # ~40 passes x 50 ms: still running when SIGTERM arrives
            req = {"prompt": "Once upon a time", "max_tokens": 40, "method": "sequential", "seed": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=req, timeout=60) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_token.set()
                result["status"], result["body"] = r.status_code, "\n".join(lines)

        t = threading.Thread(target=in_flight)
        t.start()
        assert first_token.wait(30)
        proc.send_signal(signal.SIGTERM)
        # it stops accepting: a new connection is refused while the old request still streams
        deadline = time.monotonic() + 10
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                httpx.get(url + "/health", timeout=1)
                time.sleep(0.05)
            except httpx.ConnectError:
                refused = True
        assert refused
        assert t.is_alive() or "status" in result
        t.join(60)
        assert result["status"] == 200
        events = sse_events(result["body"])
        assert events[-1] == "[DONE]"
        final = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert len(final) == 1 and final[0]["asarm"]["tokens"] == 40
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_with_a_short_grace_answers_what_is_still_running():
    """With `--grace 1` under load, requests still running when the grace ends used to get 500s,
    streams were cut with no error event, and the log showed "Task exception was never
    retrieved": now a JSON 503 each, an error event then [DONE] on the stream, exit 0."""
    proc, url = start_server("--max-batch", "2", "--grace", "1", "--pass-delay", "0.2")
    results, started = {}, threading.Event()
    req = {"prompt": "Once upon a time", "max_tokens": 40, "method": "sequential", "seed": 0}  # ~8 s of passes

    def stream():
        with httpx.stream("POST", url + "/v1/completions", json=dict(req, stream=True), timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                started.set()
            results["stream"] = r.status_code, "\n".join(lines)

    def whole(name):  # one runs beside the stream, one waits in the queue (--max-batch 2)
        r = httpx.post(url + "/v1/completions", json=req, timeout=60)
        results[name] = r.status_code, r.json()

    try:
        threads = [threading.Thread(target=stream)] + [threading.Thread(target=whole, args=(n,)) for n in "ab"]
        threads[0].start()
        assert started.wait(30)
        for t in threads[1:]:
            t.start()
        time.sleep(1.0)  # the two whole requests are in (one running beside the stream, one queued)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in "ab":
        status, body = results[name]
        assert status == 503 and "grace period ended" in body["error"]["message"], results[name]
    status, body = results["stream"]
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and "grace period ended" in events[-2]["error"]["message"]
    assert "never retrieved" not in log and "Traceback" not in log, log
