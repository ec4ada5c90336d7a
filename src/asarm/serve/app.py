"""The HTTP app: OpenAI-compatible routes, errors in OpenAI's shape, API key, metrics, playground.

``create_app(model, ...)`` builds it; the engine loop starts and stops with the app's lifespan,
which uvicorn runs after it has drained in-flight requests on SIGTERM. When the grace period
runs out first, ``ServerState.abandon_in_flight`` answers every request still running: a JSON
503, or an error event on an open stream (``asarm.serve.cmd_serve`` calls it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ASARMError, InputError
from ..lengths import PlanningTimeout, planning_budget
from ..seeds import choice_seeds, resolve_seed
from ..text import read_markup, text_only
from . import handlers
from .holes import completion_markup
from .loop import Channel, EngineLoop, Job, QueueFull, ShuttingDown
from .metrics import Metrics
from .schemas import ScoreRequest, generation_schemas

log = logging.getLogger("asarm.serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 1_000_000
PLANNING_MAX_CELLS = 1024  # exact hole-length cells per request; beyond: hole by hole (rows of the model)
PUBLIC = ("/health", "/", "/favicon.ico")  # the page is static; every API route needs the key
ENDPOINTS = {"/v1/completions", "/v1/infill", "/v1/score", "/v1/models", "/health", "/metrics", "/", "/infill"}


GRACE_OVER = "the server is shutting down: its grace period ended before this request finished"


class RequestTimeout(Exception):
    pass


class PayloadTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class ModelNotFound(Exception):
    pass


def error_response(exc: Exception, param: str | None = None) -> JSONResponse:
    """OpenAI's error object; the message is one line and never a traceback."""
    status, kind, headers, message = 500, "server_error", None, "internal server error"
    if isinstance(exc, ASARMError):
        status, kind, message = 400, "invalid_request_error", str(exc)
    elif isinstance(exc, ModelNotFound):
        status, kind, message = 404, "invalid_request_error", str(exc)
    elif isinstance(exc, QueueFull):
        status, kind, message = 429, "rate_limit_error", f"{exc}; retry later"
        headers = {"Retry-After": str(getattr(exc, "retry_after", 1))}
    elif isinstance(exc, ShuttingDown):
        status, kind, message = 503, "server_error", str(exc)
    elif isinstance(exc, RequestTimeout):
        status, kind, message = 504, "timeout_error", str(exc)
    elif isinstance(exc, PayloadTooLarge):
        status, kind, message = 413, "invalid_request_error", str(exc)
    elif isinstance(exc, StarletteHTTPException):
        status, kind, message = exc.status_code, "invalid_request_error", str(exc.detail)
    body = {"error": {"message": message.splitlines()[0] if message else kind, "type": kind,
                      "param": param, "code": getattr(exc, "code", None)}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_event(exc: Exception) -> bytes:
    return handlers.sse(json.loads(error_response(exc).body))


class ServerState:
    def __init__(self, model, model_name, loop, metrics, api_key, request_timeout):
        self.model, self.model_name, self.loop, self.metrics = model, model_name, loop, metrics
        self.tokenizer = model.tokenizer
        self.max_length = int(getattr(model.config, "max_length", None) or 512)
        self.api_key, self.request_timeout = api_key, request_timeout
        self.started = time.time()
        # CPU work outside the engine (parsing, tokenizing, hole-length planning): off the event
        # loop, one request at a time, so neither /health nor the batch waits for it
        self.workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asarm-prepare")
        # the shutdown grace ran out: answer 503 now (futures, not an asyncio.Event, which would
        # bind to the first event loop that waits on it: tests run one app under several)
        self.stopped = False
        self._stop_waiters: set[asyncio.Future] = set()

    def abandon_in_flight(self) -> None:
        """The shutdown grace period is over: every request still waiting or running is answered
        now (503; an error event on a stream) instead of being cut off. Call on the event loop."""
        self.stopped = True
        for waiter in list(self._stop_waiters):
            if not waiter.done():
                waiter.set_result(None)
        self.loop.abort(ShuttingDown(GRACE_OVER))

    def stop_waiter(self) -> asyncio.Future:
        """A future that completes when ``abandon_in_flight`` runs."""
        waiter = asyncio.get_running_loop().create_future()
        if self.stopped:
            waiter.set_result(None)
        else:
            self._stop_waiters.add(waiter)
            waiter.add_done_callback(self._stop_waiters.discard)
        return waiter

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on the worker thread, in this request's context."""
        import contextvars
        import functools

        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(context.run, fn, *args))


def create_app(model, *, model_name: str = "asarm", max_batch: int = 32, max_queue: int = 256,
               api_key: str | None = None, request_timeout: float = 120.0, pass_delay: float = 0.0,
               admit_wave: int = 1) -> FastAPI:
    from .engine import EngineAdapter

    if getattr(model, "tokenizer", None) is None:
        raise InputError("the server needs a model with a tokenizer (its checkpoint has no tokenizer files)")
    adapter = EngineAdapter(model)
    metrics = Metrics()
    loop = EngineLoop(adapter, max_batch=max_batch, max_queue=max_queue, metrics=metrics, pass_delay=pass_delay,
                      admit_wave=admit_wave)
    state = ServerState(model, model_name, loop, metrics, api_key, request_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        await asyncio.to_thread(loop.stop)
        state.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="asarm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.asarm = state
    app.add_middleware(Guard, state=state)
    app.add_exception_handler(StarletteHTTPException, _handle)
    app.add_exception_handler(Exception, _handle)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_routes(app, state, adapter)
    return app


async def _handle(request, exc):
    if not isinstance(exc, StarletteHTTPException):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(exc)


class Guard:
    """ASGI middleware: the API key (all routes but the public ones) and per-request metrics
    (status and time to the LAST byte, so streams are timed whole)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.state.api_key and not self._public(path) and not self._authorized(scope):
                exc = StarletteHTTPException(401, "invalid or missing API key: send 'Authorization: Bearer KEY'")
                return await error_response(exc)(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.state.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC or path.startswith("/static/")

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        got = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(got.encode(), f"Bearer {self.state.api_key}".encode())


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, refused (413) from its Content-Length before anything is read, or as soon as
    the streamed bytes pass ``limit`` (a chunked body has no length to check first)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, schema, state: ServerState):
    raw = await read_body(request)
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid" or not raw.strip():
            raise InputError("the request body is not valid JSON") from None
        if err["type"] == "model_type":
            raise InputError("the request body must be a JSON object") from None
        param = ".".join(str(x) for x in err["loc"]) or None
        raise FieldError(f"{param}: {err['msg']}" if param else err["msg"], param) from None
    if body.model is not None and body.model != state.model_name:
        raise ModelNotFound(f"the model {body.model!r} is not served here; this server serves {state.model_name!r}")
    return body


class FieldError(InputError):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def add_routes(app: FastAPI, state: ServerState, adapter) -> None:
    api = Api(state, adapter)
    completion_request, infill_request = generation_schemas()  # the decoding fields: DecodeConfig's

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "active_rows": state.loop.adapter.active,
                "queue_depth": state.loop.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model",
                                            "created": int(state.started), "owned_by": "asarm",
                                            "max_length": state.max_length}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.guarded(request, completion_request, api.completions)

    @app.post("/v1/infill")
    async def infill(request: Request):
        return await api.guarded(request, infill_request, api.infill)

    @app.post("/v1/score")
    async def score(request: Request):
        return await api.guarded(request, ScoreRequest, api.score)

    from .llama_infill import llama_infill_schema

    api.completion_request = completion_request
    llama_request = llama_infill_schema()

    @app.post("/infill")  # llama.cpp's, for editor plugins (asarm.serve.llama_infill)
    async def llama_infill(request: Request):
        return await api.guarded(request, llama_request, api.llama_infill)


def guided_constraints(body, markup) -> dict | None:
    """vLLM's ``guided_regex`` / ``guided_choice`` / ``guided_json`` as the constraint of the
    completion's hole. They are on the text the client gets back, which lacks the space the
    hole took over from the prompt (asarm.text.markup): that space is put in front."""
    given = [(k, v) for k, v in (("regex", body.guided_regex), ("choice", body.guided_choice),
                                 ("json_schema", body.guided_json)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InputError("give one of guided_regex, guided_choice, guided_json")
    kind, value = given[0]
    if markup.shifted and markup.shifted[0]:
        from ..text.constraints import normalize_spec, spec_regex

        kind, value = "regex", " (?:" + spec_regex(*normalize_spec({kind: value}, "guided"), "guided") + ")"
    return {0: {kind: value}}


class Api:
    """The POST routes: parse and check a body, queue its job, answer whole or as a stream."""

    def __init__(self, state: ServerState, adapter):
        self.state, self.adapter = state, adapter

    async def guarded(self, request, schema, handler):
        try:
            body = await parse_body(request, schema, self.state)
            return await handler(request, body)
        except PlanningTimeout:
            return error_response(RequestTimeout(f"the request took longer than {self.state.request_timeout:g} s "
                                                 "(choosing its hole lengths)"))
        except (ASARMError, ModelNotFound, QueueFull, ShuttingDown, RequestTimeout, PayloadTooLarge) as exc:
            return error_response(exc, getattr(exc, "param", None))
        except (ClientGone, ClientDisconnect):  # the client hung up (while sending its body, or waiting)
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - a bug (ours or the engine's): logged once, a 500
            log.error("%s failed", request.url.path, exc_info=exc)
            return error_response(exc)

    def submit(self, n_rows: int, prepare, rounds: bool = False) -> Job:
        job = Job(n_rows, prepare, Channel(), rounds=rounds)
        try:
            self.state.loop.submit(job)
        except QueueFull as exc:
            exc.retry_after = self.state.loop.retry_after
            raise
        return job

    async def generation_job(self, request, body, markup, constraints=None) -> Job:
        """Plan the hole lengths (off the event loop and off the engine thread, once per request
        whatever ``n``, bounded by the request's time limit), then queue the rows."""
        state = self.state
        if body.n > state.loop.max_batch:
            raise InputError(f"n={body.n} is more than this server's batch of {state.loop.max_batch} rows")
        config = body.decode_config()
        if not body.allow_special:  # as asarm.text.infill: holes hold text, never <unk> or <s>
            config = text_only(state.tokenizer, config)
        automata = {}
        if constraints:  # compiled (and the holes' lengths restricted) before anything is queued
            from ..text.constraints import constrain_markup

            excluded = set(config.suppress) | {state.model.config.mask_token_id}
            automata = await state.off_loop(constrain_markup, markup, constraints, state.model.config.vocab_size,
                                            excluded)
        seeds = choice_seeds(resolve_seed(body.seed), body.n)
        deadline = time.monotonic() + state.request_timeout

        budgets = []

        def plan():
            with planning_budget(max_cells=PLANNING_MAX_CELLS, deadline=deadline) as budget:
                budgets.append(budget)
                return handlers.plan_for(state.model, markup, config, body, seeds)

        try:
            plans = await asyncio.wait_for(collect(request, None, state.off_loop(plan)), state.request_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise PlanningTimeout("the hole-length planning passed the request's time limit") from None
        finally:
            for budget in budgets:  # an abandoned plan (timeout, client gone) stops at its next pass
                budget.deadline = 0.0
        job = self.submit(body.n, handlers.make_prepare(plans, config, body, automata), rounds=body.stream)
        job.config = config  # the rows' target, for exact top log-probs
        return job

    async def completions(self, request, body):
        if isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                return await self.completions_of_prompts(request, body)
            body = body.model_copy(update={"prompt": body.prompt[0]})
        markup = await self.state.off_loop(completion_markup, self.state.model, self.state.tokenizer, body,
                                           self.state.max_length)
        job = await self.generation_job(request, body, markup, guided_constraints(body, markup))
        run = CompletionRun(self.state, body, job, suffix=body.suffix is not None)
        if body.stream:
            return await stream_response(request, job, run)
        return await collect(request, job, run.answer())

    async def completions_of_prompts(self, request, body):
        """A list of prompts: each its own job of ``n`` rows (prompt i's choice j uses seed
        seed + i·n + j, so a prompt sent alone with seed + i·n gives the same text), answered as
        one completion whose choice ``i·n + j`` is prompt i's choice j, as OpenAI's."""
        if body.stream:
            raise InputError("stream takes one prompt: send a list of prompts without stream")
        base = resolve_seed(body.seed)
        bodies = [body.model_copy(update={"prompt": prompt, "seed": base + i * body.n})
                  for i, prompt in enumerate(body.prompt)]
        markups = []
        for i, sub in enumerate(bodies):  # every prompt is checked before any job is queued
            try:
                markups.append(await self.state.off_loop(completion_markup, self.state.model, self.state.tokenizer,
                                                         sub, self.state.max_length))
            except InputError as exc:
                raise FieldError(f"prompt.{i}: {exc}", f"prompt.{i}") from None
        runs = []
        try:
            for sub, markup in zip(bodies, markups):
                job = await self.generation_job(request, sub, markup)
                runs.append(CompletionRun(self.state, sub, job, suffix=sub.suffix is not None))
            answers = await collect(request, None, asyncio.gather(*(run.answer_body() for run in runs)))
        except BaseException:
            for run in runs:
                self.state.loop.cancel(run.job)
            raise
        choices = [dict(c, index=i * body.n + c["index"]) for i, a in enumerate(answers) for c in a["choices"]]
        usage = {key: sum(a["usage"][key] for a in answers) for key in answers[0]["usage"]}
        stats = [s for run in runs for s in run.stats]
        return JSONResponse(dict(answers[0], choices=choices, usage=usage, asarm=handlers.totals(stats)))

    async def llama_infill(self, request, body):
        from . import llama_infill as llama

        state, started = self.state, time.monotonic()
        if body.n_predict == 0:  # the plugins' context warm-up: nothing to generate
            return JSONResponse(llama.select_fields(llama.empty_answer(body, state.model_name), body.response_fields))

        def read(completion):
            return completion_markup(state.model, state.tokenizer, completion, state.max_length)

        completion, markup, truncated = await state.off_loop(llama.fitted_completion, body, self.completion_request,
                                                             state.tokenizer, state.max_length, read)
        job = await self.generation_job(request, completion, markup)
        run = CompletionRun(state, completion, job, suffix=completion.suffix is not None)
        if body.stream:
            return await stream_response(request, job, llama.LlamaStream(run, body, truncated, started, error_event))
        result = await collect(request, job, run.answer_body())
        return JSONResponse(llama.select_fields(llama.answer(result, completion, body, truncated, started,
                                                             state.model_name), body.response_fields))

    async def infill(self, request, body):
        markup = await self.state.off_loop(lambda: read_markup(self.state.model, body.text, self.state.tokenizer,
                                                               max_hole=body.max_hole, max_length=self.state.max_length))
        job = await self.generation_job(request, body, markup, body.constraints)
        run = InfillRun(self.state, body, job)
        if body.stream:
            return await stream_response(request, job, run)
        return await collect(request, job, run.answer())

    async def score(self, request, body: ScoreRequest):
        from ..scoring import score
        from ..text import parse_scored_text

        state = self.state
        ids, hidden = await state.off_loop(parse_scored_text, state.tokenizer, body.text, state.max_length)
        if len(ids) > state.max_length:
            raise InputError(f"the text is {len(ids)} tokens, more than the model's maximum length of {state.max_length}")
        if len(ids) == 0:
            raise InputError("nothing to score: the text has no tokens")

        def prepare():
            return [], score(state.model, ids, hidden, order=body.order, seed=body.seed,
                             temperature=body.temperature)

        job = self.submit(0, prepare)
        return await collect(request, job, score_answer(state, ids, hidden, job))


async def stream_response(request: Request, job: Job, run) -> StreamingResponse:
    """Headers go out once the job has started (its rows are in the batch), so an error found
    while preparing it (e.g. no hole length fits) is still a plain 4xx, not an event."""
    gen = events(run.state, job)
    first = await collect(request, job, gen.__anext__())  # a client gone while queued cancels it
    return StreamingResponse(run.stream(first, gen), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


async def events(state: ServerState, job: Job):
    """A job's events until its end; on timeout, error, or the consumer going away, the job is
    cancelled (its rows leave the batch at the next pass)."""
    deadline = time.monotonic() + state.request_timeout
    finished = False
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                kind, payload = await job.channel.get(max(left, 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                raise RequestTimeout(f"the request took longer than {state.request_timeout:g} s") from None
            if kind == "error":
                finished = True
                raise payload
            yield kind, payload
            if kind == "end":
                finished = True
                return
    finally:
        if not finished:
            state.loop.cancel(job)


async def collect(request: Request, job: Job, answer):
    """Await a non-streaming answer while watching for the client to hang up and for the end
    of the shutdown grace period (then ShuttingDown: a 503)."""
    state = request.app.state.asarm
    task = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request))
    stopping = state.stop_waiter()
    answered = False
    try:
        await asyncio.wait({task, gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
        answered = task.done()
    finally:  # also when this request's own task is cancelled: nothing is left running unobserved
        for future in (task, gone, stopping):
            if future is not task or not answered:
                future.cancel()
            future.add_done_callback(_retrieve)
    if answered:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # its clean-up (the job is cancelled) runs before the answer goes out
    if stopping.done() and not stopping.cancelled():
        raise ShuttingDown(GRACE_OVER)
    raise ClientGone()


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned future's exception as seen (no "Task exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Run:
    """What the completion and infill answers share: one Choice and one stats entry per choice,
    and the collection of every choice's end result."""

    def __init__(self, state: ServerState, body, job: Job, id_prefix: str):
        self.state, self.body, self.job = state, body, job
        self.rid, self.created = handlers.new_id(id_prefix)
        self.choices: list[handlers.Choice] = []
        self.stats: list[dict | None] = [None] * body.n

    def _finish_choice(self, index: int, result) -> tuple[handlers.Choice, str]:
        """The choice's final region text; its stats recorded."""
        ch = self.choices[index]
        text = ch.done(result)
        self.stats[index] = handlers.row_stats(result, ch.holes, self.job.admitted - self.job.arrived,
                                        time.monotonic() - self.job.admitted)
        return ch, text

    async def _results(self) -> list:
        """Every choice's ``_done`` result, in choice order, once the job has finished."""
        done = {}
        async for kind, payload in events(self.state, self.job):
            if kind == "start":
                self._start(payload)
            elif kind == "done":
                done[payload[0]] = self._done(*payload)
        return [done[i] for i in range(self.body.n)]


class CompletionRun(Run):
    """One /v1/completions request: the middle (or continuation) text of each choice."""

    def __init__(self, state: ServerState, body, job: Job, suffix: bool):
        super().__init__(state, body, job, "cmpl")
        self.finish = "stop" if suffix else "length"

    def _start(self, plans) -> None:
        for plan in plans:
            start, end = plan.spans[0]
            self.choices.append(handlers.Choice(self.state.tokenizer, plan, start, end, drop_space=plan.space_moved))

    def _done(self, index: int, result) -> str:
        return self._finish_choice(index, result)[1]

    def _chunk(self, index, text, finish=None, **extra) -> dict:
        return handlers.completion_chunk(self.rid, self.created, self.state.model_name, index, text, finish, **extra)

    async def _logprobs(self, index):
        """The choice's logprobs object (None unless asked), its top-n alternatives computed off
        the event loop (one pass: ``asarm.serve.logprobs``)."""
        if self.body.logprobs is None:
            return None
        top = None
        if self.body.logprobs > 0:
            from .logprobs import top_logprobs

            ch = self.choices[index]
            top = await self.state.off_loop(top_logprobs, self.state.model, self.state.tokenizer, ch.result,
                                            self.job.config, ch.start, ch.end, self.body.logprobs)
        echo = self.body.prompt if self.body.echo else None
        return handlers.completion_logprobs(self.state.tokenizer, self.choices[index], top, echo)

    def _echo(self, text: str) -> str:
        return self.body.prompt + text if self.body.echo else text

    async def answer_body(self) -> dict:
        texts = await self._results()
        choices = [{"text": self._echo(texts[i]), "index": i, "logprobs": await self._logprobs(i),
                    "finish_reason": self.finish, "asarm": self.stats[i]} for i in range(self.body.n)]
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.state.model_name, "choices": choices,
                "usage": handlers.usage(self.choices), "asarm": handlers.totals(self.stats)}

    async def answer(self) -> JSONResponse:
        return JSONResponse(await self.answer_body())

    async def stream(self, first, rest):
        try:
            async for kind, payload in _chain(first, rest):
                if kind == "start":
                    self._start(payload)
                    if self.body.echo:  # the prompt first, as OpenAI's echo
                        for index in range(len(self.choices)):
                            yield handlers.sse(self._chunk(index, self.body.prompt))
                elif kind == "round":
                    index, event = payload
                    piece = self.choices[index].take(event)
                    if piece:
                        yield handlers.sse(self._chunk(index, piece))
                elif kind == "done":
                    index = payload[0]
                    ch = self.choices[index]
                    tail = self._done(*payload)[ch.emitted:]
                    extra = {"logprobs": await self._logprobs(index)} if self.body.logprobs is not None else {}
                    yield handlers.sse(self._chunk(index, tail, self.finish, asarm=self.stats[index], **extra))
            final = {"id": self.rid, "object": "text_completion", "created": self.created,
                     "model": self.state.model_name, "choices": [], "usage": handlers.usage(self.choices),
                     "asarm": handlers.totals(self.stats)}
            yield handlers.sse(final)
        except Exception as exc:  # noqa: BLE001 - the stream has started: the error is an event
            if not isinstance(exc, (ASARMError, RequestTimeout, ShuttingDown)):
                log.exception("a completion stream failed")
            yield error_event(exc)
        finally:
            await rest.aclose()  # the job is cancelled at once if the client went away
        yield handlers.sse("[DONE]")


class InfillRun(Run):
    """One /v1/infill request: the whole filled text, per-hole texts, events with positions."""

    def __init__(self, state: ServerState, body, job: Job):
        super().__init__(state, body, job, "infill")

    def _start(self, plans) -> dict:
        tok = self.state.tokenizer
        out = []
        for i, plan in enumerate(plans):
            choice = handlers.Choice(tok, plan, 0, len(plan.input_ids))
            self.choices.append(choice)
            pieces = [{"text": "" if m else handlers.decode(tok, [t]), "hidden": m}
                      for t, m in zip(plan.input_ids.tolist(), plan.masked.tolist())]
            out.append({"index": i, "tokens": pieces, "holes": choice.holes})
        return {"object": "infill.start", "id": self.rid, "model": self.state.model_name, "choices": out}

    def _done(self, index: int, result) -> dict:
        ch, text = self._finish_choice(index, result)
        holes = [dict(h, text=handlers.decode(self.state.tokenizer, ch.ids[h["start"]:h["start"] + h["length"]]))
                 for h in ch.holes]
        out = {"index": index, "text": text, "holes": holes, "finish_reason": "stop", "asarm": self.stats[index]}
        if self.body.logprobs:
            lp = result.token_logprobs.reshape(-1).tolist()
            out["logprobs"] = [{"position": p, "logprob": lp[p]} for p in ch.plan.masked.nonzero().flatten().tolist()]
        return out

    def _round(self, index: int, event) -> dict:
        tok = self.state.tokenizer
        piece = self.choices[index].take(event)
        return {"object": "infill.round", "index": index, "round": event.round, "nfe": event.nfe,
                "positions": list(event.positions), "tokens": [int(t) for t in event.tokens],
                "texts": [handlers.decode(tok, [int(t)]) for t in event.tokens], "resampled": event.resampled,
                "text": piece}

    async def answer(self) -> JSONResponse:
        choices = await self._results()
        return JSONResponse({"id": self.rid, "object": "infill", "created": self.created,
                             "model": self.state.model_name, "choices": choices,
                             "usage": handlers.usage(self.choices), "asarm": handlers.totals(self.stats)})

    async def stream(self, first, rest):
        try:
            async for kind, payload in _chain(first, rest):
                if kind == "start":
                    yield handlers.sse(self._start(payload))
                elif kind == "round":
                    yield handlers.sse(self._round(*payload))
                elif kind == "done":
                    yield handlers.sse(dict(self._done(*payload), object="infill.done"))
            yield handlers.sse({"object": "infill.end", "id": self.rid, "usage": handlers.usage(self.choices),
                         "asarm": handlers.totals(self.stats)})
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, (ASARMError, RequestTimeout, ShuttingDown)):
                log.exception("an infill stream failed")
            yield error_event(exc)
        finally:
            await rest.aclose()  # the job is cancelled at once if the client went away
        yield handlers.sse("[DONE]")


async def score_answer(state: ServerState, ids, hidden, job: Job) -> JSONResponse:
    result = None
    async for kind, payload in events(state, job):
        if kind == "start":
            result = payload
    n = int(result.num_tokens)
    lp = result.token_log_probs.tolist()
    tokens = [{"position": p, "text": handlers.decode(state.tokenizer, [int(ids[p])]), "logprob": lp[p]}
              for p in hidden.nonzero().flatten().tolist()]
    nll = -float(result.log_prob)
    # a near-zero temperature can give an infinite perplexity, which JSON cannot carry: null
    return JSONResponse({"object": "score", "model": state.model_name, "log_prob": finite(-nll), "num_tokens": n,
                         "nll_per_token": finite(nll / max(n, 1)), "perplexity": finite(float(result.perplexity)),
                         "nfe": result.nfe, "tokens": [dict(t, logprob=finite(t["logprob"])) for t in tokens]})


def finite(value):
    """``value``, or None where it is not a finite number (JSON has no inf or nan)."""
    return value if value is None or math.isfinite(value) else None
