"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread."""

from __future__ import annotations

import contextlib
import threading
import time

import torch

import asarm

_MODEL = None


def shipped_model():
    """asarm-en-small, loaded once per test session (a real tokenizer and weights)."""
    global _MODEL
    if _MODEL is None:
        torch.set_num_threads(1)
        _MODEL = asarm.load_model("asarm-en-small")
    return _MODEL


@contextlib.contextmanager
def running_server(model=None, **options):
    """Yields the base URL of a server for ``create_app(model, **options)``; stops it after."""
    import uvicorn

    from asarm.serve.app import create_app

    model = model or shipped_model()
    options.setdefault("model_name", "asarm-en-small")
    app = create_app(model, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def sse_events(text: str) -> list:
    """The data payloads of an SSE body, in order (JSON-decoded, '[DONE]' kept as a string)."""
    import json

    out = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
