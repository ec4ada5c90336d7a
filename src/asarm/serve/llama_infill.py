"""llama.cpp's ``POST /infill``, so editor plugins that speak it (llama.vim, llama.vscode) work
unchanged against ``asarm serve``.

The request (llama.cpp server README, "POST /infill"): ``input_prefix`` (text before the cursor's
line, or all text before the cursor), ``input_suffix``, ``input_extra`` (chunks
``{"filename", "text"}`` of other files: context before the prefix), ``prompt`` (the cursor's line
up to the cursor: it follows the prefix), ``n_predict`` (-1: up to ``max_hole``; 0: nothing to
generate, as the plugins' context warm-up calls), ``temperature``, ``top_k``, ``top_p``, ``seed``
(-1 or absent: a fresh one), ``stream``, ``response_fields``; and asarm's decoding fields
(``method``, ``k``, ...). llama.cpp's other options (``samplers``, ``cache_prompt``, ``n_indent``,
``t_max_*_ms``, ...) are accepted and have no effect.

It is a completion with a suffix underneath (``asarm.serve.holes.completion_markup``): the middle's
length is drawn from its exact posterior over 1..min(n_predict, max_hole), or, with an empty
suffix, is n_predict tokens. Context that does not fit the model's length limit is cut as
llama.cpp cuts it: the prefix keeps its end, the suffix its start, the extra chunks go first.

The answer has llama.cpp's fields: ``content``, ``stop``, ``stop_type``, ``tokens_predicted``,
``tokens_evaluated``, ``truncated``, ``timings``, ``generation_settings``, ...; streamed, one
``data: {"content": …, "stop": false}`` event per settled piece and a last one with ``stop: true``
and the statistics.
"""

from __future__ import annotations

import time
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from ..errors import InputError
from ..tokenization import decode_text, encode
from .schemas import MAX_CHARS, decode_fields

MAX_EXTRA_CHUNKS = 256
FIT_TRIES = 4  # re-encoding a cut text can shift a token or two: cut a little more and retry


class ExtraChunk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    filename: str = ""
    text: str = Field("", max_length=MAX_CHARS)


class LlamaInfillBase(BaseModel):
    """llama.cpp's fields; unknown llama.cpp options are ignored (plugins send many)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input_prefix: str = Field("", max_length=MAX_CHARS)
    input_suffix: str = Field("", max_length=MAX_CHARS)
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=MAX_EXTRA_CHUNKS)
    prompt: str = Field("", max_length=MAX_CHARS)
    n_predict: int = Field(-1, ge=-1, le=100_000)
    seed: int | None = Field(None, ge=-1, le=2**62)
    stream: bool = False
    response_fields: list[str] | None = None
    max_hole: int = Field(32, ge=1, le=4096)
    allow_special: bool = False
    order: str = "left-to-right"

    @field_validator("model", mode="before")
    @classmethod
    def _any_model(cls, value):
        return None  # llama.cpp serves one model and ignores the name; plugins send placeholders


def llama_infill_schema() -> type[BaseModel]:
    """The request schema: llama.cpp's fields plus the decoding fields of ``DecodeConfig``
    (llama.cpp's defaults for temperature, top_k and top_p)."""
    fields = decode_fields()
    overrides = {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
    for name, default in overrides.items():
        if name in fields:
            annotation, info = fields[name]
            info.default = default
            fields[name] = (annotation, info)
    return create_model("LlamaInfillRequest", __base__=LlamaInfillBase, **fields)


def _cut(tokenizer, text: str, keep: int, tail: bool) -> tuple[str, bool]:
    """``text`` cut to its last (``tail``) or first ``keep`` tokens; whether anything was cut."""
    ids = encode(tokenizer, text) if text else []
    if len(ids) <= keep:
        return text, False
    kept = ids[len(ids) - keep:] if tail else ids[:keep]
    return (decode_text(tokenizer, kept) if keep > 0 else ""), True


def completion_body(body, tokenizer, max_length: int, margin: int = 0) -> tuple[dict, bool]:
    """The /v1/completions body this request is (prompt = extra chunks + prefix + prompt,
    suffix = input_suffix), the context cut to the model's limit; and whether it was cut."""
    wanted = body.max_hole if body.n_predict < 0 else body.n_predict
    reserve = max(1, min(wanted, max_length // 4))  # room kept for the middle
    room = max(0, max_length - reserve - margin)
    suffix, cut_suffix = _cut(tokenizer, body.input_suffix, room // 4, tail=False)
    used = len(encode(tokenizer, suffix)) if suffix else 0
    before, cut_before = _cut(tokenizer, body.input_prefix + body.prompt, room - used, tail=True)
    used += len(encode(tokenizer, before)) if before else 0
    extra = "".join(chunk.text if chunk.text.endswith("\n") or not chunk.text else chunk.text + "\n"
                    for chunk in body.input_extra)
    extra, cut_extra = _cut(tokenizer, extra, room - used, tail=True)
    out = {"prompt": extra + before, "max_tokens": max(1, min(wanted, max_length)), "max_hole": body.max_hole,
           "allow_special": body.allow_special, "order": body.order, "n": 1, "stream": body.stream}
    if suffix:
        out["suffix"] = suffix
    for name in decode_fields():
        out[name] = getattr(body, name)
    if body.seed is not None and body.seed >= 0:
        out["seed"] = body.seed
    return out, cut_suffix or cut_before or cut_extra


def fitted_completion(body, schema, tokenizer, max_length: int, read):
    """(completion request, markup, truncated): cut until ``read`` (the server's
    ``completion_markup``) accepts the text within the model's limit."""
    last = None
    for attempt in range(FIT_TRIES):
        fields, truncated = completion_body(body, tokenizer, max_length, margin=8 * attempt)
        request = schema.model_validate(fields)
        try:
            return request, read(request), truncated
        except InputError as exc:
            if "maximum length" not in str(exc):
                raise
            last = exc
    raise last


def answer(completion: dict, request, body, truncated: bool, started: float, model_name: str) -> dict:
    """llama.cpp's /infill answer from the completion's answer (streamed: the last event's, with
    the statistics)."""
    choice = completion["choices"][0]
    usage = completion["usage"]
    stats = choice.get("asarm") or {}
    predicted, evaluated = usage["completion_tokens"], usage["prompt_tokens"]
    elapsed_ms = (time.monotonic() - started) * 1000
    queue_ms = float(stats.get("queue_ms", 0.0))
    predicted_ms = max(elapsed_ms - queue_ms, 1e-3)
    return {
        "index": 0, "content": choice["text"], "tokens": [], "id_slot": 0, "stop": True, "model": model_name,
        "tokens_predicted": predicted, "tokens_evaluated": evaluated,
        "generation_settings": {"n_predict": body.n_predict, "temperature": request.temperature,
                                "top_k": request.top_k, "top_p": request.top_p, "seed": request.seed,
                                "method": request.method, "k": request.k},
        "prompt": request.prompt, "has_new_line": "\n" in choice["text"], "truncated": truncated,
        "stop_type": "eos" if request.suffix is not None else "limit", "stopping_word": "", "tokens_cached": 0,
        "timings": {"prompt_n": evaluated, "prompt_ms": queue_ms,
                    "prompt_per_token_ms": queue_ms / max(evaluated, 1),
                    "prompt_per_second": evaluated / max(queue_ms / 1000, 1e-9) if queue_ms else None,
                    "predicted_n": predicted, "predicted_ms": predicted_ms,
                    "predicted_per_token_ms": predicted_ms / max(predicted, 1),
                    "predicted_per_second": predicted / (predicted_ms / 1000)},
        "asarm": stats,
    }


def empty_answer(body, model_name: str) -> dict:
    """n_predict = 0 (the plugins' context warm-up): nothing to generate."""
    return {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": model_name,
            "tokens_predicted": 0, "tokens_evaluated": 0, "truncated": False, "stop_type": "limit",
            "stopping_word": "", "tokens_cached": 0, "has_new_line": False,
            "timings": {"prompt_n": 0, "prompt_ms": 0.0, "predicted_n": 0, "predicted_ms": 0.0}}


def select_fields(answer: dict, fields: list[str] | None) -> dict:
    """llama.cpp's ``response_fields``: only the listed fields, nested ones named by their path
    ("timings/prompt_n"); fields the answer lacks are left out."""
    if fields is None:
        return answer
    out = {}
    for path in fields:
        value, found = answer, bool(path)
        for key in path.split("/") if path else []:
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            out[path] = value
    return out



class LlamaStream:
    """A streamed /infill: llama.cpp's events from a completion run's engine events."""

    def __init__(self, run, body, truncated: bool, started: float, error_event):
        self.run, self.state, self.body = run, run.state, body
        self.truncated, self.started = truncated, started
        self.error_event = error_event  # an exception -> its SSE error event (the server's)

    def _event(self, content: str) -> dict:
        return {"index": 0, "content": content, "tokens": [], "stop": False, "id_slot": 0}

    async def stream(self, first, rest):
        from . import handlers

        async def chain():
            yield first
            async for item in rest:
                yield item

        run, text = self.run, ""
        try:
            async for kind, payload in chain():
                if kind == "start":
                    run._start(payload)
                elif kind == "round":
                    index, event = payload
                    piece = run.choices[index].take(event)
                    if piece:
                        text += piece
                        yield handlers.sse(self._event(piece))
                elif kind == "done":
                    ch = run.choices[payload[0]]
                    tail = run._done(*payload)[ch.emitted:]
                    if tail:
                        text += tail
                        yield handlers.sse(self._event(tail))
            completion = {"choices": [{"text": text, "asarm": run.stats[0]}], "usage": handlers.usage(run.choices)}
            last = answer(completion, run.body, self.body, self.truncated, self.started, self.state.model_name)
            yield handlers.sse(select_fields(dict(last, content=""), self.body.response_fields))
        except Exception as exc:  # noqa: BLE001 - the stream has started: the error is an event
            yield self.error_event(exc)
        finally:
            await rest.aclose()
