"""Turning request bodies into engine jobs, and engine events into OpenAI-shaped answers.

Text work that needs no model (parsing, tokenizing, limits) happens in the request handler, so
bad input is refused before it is queued; work that needs the model (length posteriors,
scoring) happens in the job's ``prepare``, on the engine thread.
"""

from __future__ import annotations

import json
import random
import time
import uuid

from ..tokenization import decode, settled_text
from .holes import plan_layouts
from .loop import RowSpec


def _int(x) -> int:
    return int(x.reshape(-1)[0]) if hasattr(x, "reshape") else int(x)


def row_stats(result, layout, queued_s: float, elapsed_s: float) -> dict:
    """The ``asarm`` stats field of one choice."""
    accepted = result.accepted[0] if result.accepted and isinstance(result.accepted[0], list) else result.accepted
    tokens, nfe = sum(accepted), _int(result.nfe)
    return {"nfe": nfe, "draft_calls": _int(result.draft_calls), "rounds": _int(result.rounds),
            "tokens": tokens, "tokens_per_pass": round(tokens / max(nfe, 1), 4),
            "tokens_per_round": list(accepted), "holes": layout.holes,
            "queue_ms": round(queued_s * 1000, 1), "elapsed_ms": round(elapsed_s * 1000, 1)}


class Choice:
    """One row as it fills in: the known tokens, the round that produced each, and the text of
    ``[start, end)`` that is final so far (left to right; ASSD may fill out of order)."""

    def __init__(self, tokenizer, layout, start: int, end: int, drop_space: bool = False):
        self.tok, self.layout, self.start, self.end = tokenizer, layout, start, end
        # the region follows text that ended in a space, and that space moved into the region:
        # the client already has it, so the region's text starts after it
        self.drop_space = drop_space
        self.ids = layout.input_ids.tolist()
        self.known = (~layout.masked).tolist()
        self.base = decode(tokenizer, self.ids[:start])
        self.frontier, self.emitted = start, 0
        self.result = None

    def apply(self, event) -> str:
        """Take a round's tokens; the newly final text of the region."""
        for pos, tok in zip(event.positions, event.tokens):
            self.ids[pos], self.known[pos] = int(tok), True
        f = self.frontier
        while f < self.end and self.known[f]:
            f += 1
        if f == self.frontier:
            return ""
        self.frontier = f
        text = self._region(f)
        if text is None:  # a character split across tokens: wait
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def finish(self, result) -> str:
        """The region's final text (what ``apply`` has not sent yet is the tail of it)."""
        self.result = result
        self.ids = result.input_ids.reshape(-1).tolist()
        return self._region(self.end)

    def _region(self, end: int) -> str | None:
        """The region's text up to token ``end``; None while it ends inside a character."""
        text = settled_text(self.tok, self.ids[:end], complete=end >= self.end)
        if text is None:
            return None
        text = text[len(self.base):]
        return text[1:] if self.drop_space and text.startswith(" ") else text


def plan_for(model, markup, config, body, seeds: list[int]):
    """Every choice's hole lengths and layout (the model's work outside the engine: it runs
    before the job is queued, never on the engine thread)."""
    return plan_layouts(model, markup, seeds, greedy=config.greedy, temperature=config.temperature,
                        length_prior=body.length_prior)


def make_prepare(layouts, config, body, seeds: list[int]):
    """The job's engine-thread half: lay out each row (the lengths are already chosen)."""

    def prepare():
        rows = [RowSpec(lay.input_ids, lay.masked, config, seed=s, order=body.order,
                        return_logprobs=bool(getattr(body, "logprobs", False)))
                for lay, s in zip(layouts, seeds)]
        return rows, layouts

    return prepare


def seeds_for(body) -> list[int]:
    base = body.seed if body.seed is not None else random.SystemRandom().randrange(2**62)
    return [base + i for i in range(body.n)]


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish=None, **extra) -> dict:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    choice.update(extra)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def completion_logprobs(tok, choice: Choice) -> dict:
    """OpenAI's legacy logprobs object for the generated region (top_logprobs are not given)."""
    lp = choice.result.token_logprobs
    lp = lp.reshape(-1).tolist() if lp is not None else [None] * len(choice.ids)
    tokens, values, offsets, offset = [], [], [], 0
    for pos in range(choice.start, choice.end):
        piece = decode(tok, [choice.ids[pos]])
        tokens.append(piece)
        values.append(lp[pos])
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}


def usage(choices: list[Choice]) -> dict:
    prompt = sum(1 for k in (~choices[0].layout.masked).tolist() if k) if choices else 0
    completion = sum(int(c.layout.masked.sum()) for c in choices)
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
