"""Turning request bodies into engine jobs, and engine events into OpenAI-shaped answers.

Text work that needs no model (parsing, tokenizing, limits: ``asarm.text.read_markup``) happens
before the job is queued, off the event loop, so bad input is refused early; the length
posteriors (``asarm.text.plan_rows``) too, on a worker thread with the request's budget
(``plan_for``), so they never hold the engine; the job's ``prepare`` only lays out the rows.
"""

from __future__ import annotations

import json
import time
import uuid

from ..text import SettledText, plan_rows
from ..tokenization import decode
from .holes import hole_info
from .loop import RowSpec


def _int(x) -> int:
    return int(x.reshape(-1)[0]) if hasattr(x, "reshape") else int(x)


def row_stats(result, holes: list[dict], queued_s: float, elapsed_s: float) -> dict:
    """The ``asarm`` stats field of one choice."""
    accepted = result.accepted[0] if result.accepted and isinstance(result.accepted[0], list) else result.accepted
    tokens, nfe = sum(accepted), _int(result.nfe)
    return {"nfe": nfe, "draft_calls": _int(result.draft_calls), "rounds": _int(result.rounds),
            "tokens": tokens, "tokens_per_pass": round(tokens / max(nfe, 1), 4),
            "tokens_per_round": list(accepted), "holes": holes,
            "queue_ms": round(queued_s * 1000, 1), "elapsed_ms": round(elapsed_s * 1000, 1)}


class Choice(SettledText):
    """One row as it fills in: the text of ``[start, end)`` that is final so far (left to right;
    ASSD may fill out of order), its plan, and once done its result."""

    def __init__(self, tokenizer, plan, start: int, end: int, drop_space: bool = False):
        super().__init__(tokenizer, plan.input_ids.tolist(), (~plan.masked).tolist(), start, end, drop_space)
        self.plan = plan
        self.holes = hole_info(plan)
        self.result = None

    def take(self, event) -> str:
        """Take a round's tokens; the newly final text of the region."""
        return self.apply(event.positions, event.tokens)

    def done(self, result) -> str:
        """The region's final text (what ``take`` has not sent yet is the tail of it)."""
        self.result = result
        return self.finish(result.input_ids.reshape(-1).tolist())


def plan_for(model, markup, config, body, seeds: list[int]):
    """Every choice's planned row, hole lengths drawn with the choice's seed: the model's work
    outside the engine (it runs before the job is queued, never on the engine thread)."""
    return plan_rows(model, markup, seeds, length_prior=body.length_prior, greedy=config.greedy,
                     temperature=config.temperature)


def make_prepare(plans, config, body, automata=None):
    """The job's engine-thread half: the rows to start (the lengths are already chosen), with
    their constrained holes (``automata``: {hole index: TokenAutomaton})."""
    from ..text.constraints import hole_constraints

    def prepare():
        rows = [RowSpec(plan.input_ids, plan.masked, config, seed=plan.seed, order=body.order,
                        return_logprobs=bool(getattr(body, "logprobs", False)),
                        constraints=hole_constraints(plan.spans, automata) if automata else None)
                for plan in plans]
        return rows, plans

    return prepare


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish=None, **extra) -> dict:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    choice.update(extra)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def completion_logprobs(tok, choice: Choice, top: list[dict] | None = None, echo: str | None = None) -> dict:
    """OpenAI's legacy logprobs object for the generated region: each token, its log-prob, and
    with ``top`` (``asarm.serve.logprobs.top_logprobs``) its likeliest alternatives. With
    ``echo`` (the prompt's text, put before the region) the prompt's tokens come first, with
    log-prob None (they are given, not drawn)."""
    lp = choice.result.token_logprobs
    lp = lp.reshape(-1).tolist() if lp is not None else [None] * len(choice.ids)
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    if echo is not None:
        for pos in range(choice.start):
            piece = decode(tok, [choice.ids[pos]])
            tokens.append(piece)
            values.append(None)
            tops.append(None)
            offsets.append(offset)
            offset += len(piece)
        offset = len(echo)
    for i, pos in enumerate(range(choice.start, choice.end)):
        piece = decode(tok, [choice.ids[pos]])
        tokens.append(piece)
        values.append(lp[pos])
        tops.append(top[i] if top is not None else None)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops if top is not None else None,
            "text_offset": offsets}


def usage(choices: list[Choice]) -> dict:
    prompt = sum(1 for k in (~choices[0].plan.masked).tolist() if k) if choices else 0
    completion = sum(int(c.plan.masked.sum()) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def totals(stats: list[dict]) -> dict:
    """The top-level ``asarm`` field: sums over the choices (per-choice stats sit in each choice)."""
    nfe = sum(s["nfe"] for s in stats)
    tokens = sum(s["tokens"] for s in stats)
    out = {"nfe": nfe, "rounds": sum(s["rounds"] for s in stats), "tokens": tokens,
           "tokens_per_pass": round(tokens / max(nfe, 1), 4)}
    if len(stats) == 1:
        out["holes"] = stats[0]["holes"]
    return out


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()


def new_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
