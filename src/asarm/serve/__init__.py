"""``asarm serve``: an OpenAI-compatible infilling server with continuous batching.

    asarm serve --model asarm-en-small --port 8000 --max-batch 32

Routes: POST /v1/completions, /v1/infill, /v1/score; GET /v1/models, /health, /metrics, and the
playground page at /. ``create_app(model, ...)`` (asarm.serve.app) builds the ASGI app.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

# Seconds uvicorn waits after the grace period, while the requests still in flight are answered
# 503 (streams: an error event); without them it cancelled those requests (500s, cut streams).
ANSWER_SECONDS = 2.0


def cmd_serve(args) -> int:
    import uvicorn

    from ..checkpoint import DEFAULT_MODEL
    from ..cli_args import apply_threads, load_cli_model
    from ..errors import InputError
    from .app import create_app

    api_key = check_serve_options(args)
    apply_threads(args.threads)  # --threads / ASARM_NUM_THREADS, like every model command
    port_free(args.host, args.port)  # before the model loads: a busy port is one line, at once
    model = load_cli_model(args)
    name = args.served_name or os.path.basename(str(args.model or DEFAULT_MODEL).rstrip("/"))
    app = create_app(model, model_name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                     api_key=api_key, request_timeout=args.request_timeout, pass_delay=args.pass_delay)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # limits at the transport: a slow or idle connection is closed, headers are bounded (h11),
    # and beyond limit_concurrency connections uvicorn answers 503 without reading anything
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace + ANSWER_SECONDS,
                            access_log=args.log_level == "debug",
                            limit_concurrency=args.max_queue + args.max_batch + 64, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024, http="h11")
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal: make that second
    # delivery a no-op so a graceful stop exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    draining_server(config, args.grace, app.state.asarm.abandon_in_flight).run()
    return 0


def draining_server(config, grace: float, on_grace_over):
    """A uvicorn server whose shutdown calls ``on_grace_over`` (on the event loop) once
    ``grace`` seconds have passed with requests still in flight; uvicorn itself waits
    ``ANSWER_SECONDS`` more for their answers to go out."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            timer = asyncio.get_running_loop().call_later(grace, on_grace_over)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return DrainingServer(config)


def check_serve_options(args) -> str | None:
    """Every option value checked before anything loads (one line, exit 2). Returns the API key."""
    import math

    from ..errors import InputError

    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise InputError(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    if not (math.isfinite(args.grace) and args.grace >= 0):
        raise InputError(f"--grace must be a number of seconds >= 0, got {args.grace}")
    if not (math.isfinite(args.pass_delay) and args.pass_delay >= 0):
        raise InputError(f"--pass-delay must be >= 0, got {args.pass_delay}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("ASARM_API_KEY")
    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty (--api-key '' or ASARM_API_KEY=''): give a key, or leave the "
                         "option out to serve without one")
    if api_key is not None and (api_key != api_key.strip() or not api_key.isprintable()):
        raise InputError("the API key must be printable and have no surrounding spaces")
    return api_key


def port_free(host: str, port: int) -> None:
    """Bind and release the address: a port in use is one line now, not uvicorn's traceback later."""
    import socket

    from ..errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def add_cli(sub) -> None:
    from ..cli_args import add_model_arguments

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a playground",
                       description="Serve a model over HTTP: /v1/completions (prompt + suffix infilling), "
                                   "/v1/infill, /v1/score, /v1/models, /health, /metrics and a playground at /.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most rows decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="most requests waiting; beyond it 429 (default 256)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but "
                   "/health and the page (default: $ASARM_API_KEY, else no key)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is cancelled")
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests; "
                   "then those still running are answered 503 (streams: an error event)")
    p.add_argument("--served-name", default=None, help="model id in the API (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--pass-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slow engine
    add_model_arguments(p, generation=True)
    p.set_defaults(func=cmd_serve)
