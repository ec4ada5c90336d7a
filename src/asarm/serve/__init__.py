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


def cmd_serve(args) -> int:
    import uvicorn

    from ..checkpoint import DEFAULT_MODEL
    from ..cli_args import apply_threads, load_cli_model
    from ..errors import InputError
    from .app import create_app

    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.request_timeout <= 0 or args.grace < 0:
        raise InputError("--request-timeout must be > 0 and --grace >= 0")
    apply_threads(args.threads)  # --threads / ASARM_NUM_THREADS, like every model command
    model = load_cli_model(args)
    name = args.served_name or os.path.basename(str(args.model or DEFAULT_MODEL).rstrip("/"))
    api_key = args.api_key or os.environ.get("ASARM_API_KEY") or None
    app = create_app(model, model_name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                     api_key=api_key, request_timeout=args.request_timeout, pass_delay=args.pass_delay)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace, access_log=args.log_level == "debug")
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal: make that second
    # delivery a no-op so a graceful stop exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


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
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    p.add_argument("--served-name", default=None, help="model id in the API (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--pass-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slow engine
    add_model_arguments(p)
    p.set_defaults(func=cmd_serve)
