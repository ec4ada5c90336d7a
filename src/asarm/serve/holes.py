"""How the server reads a completion request's holes: prompt, middle, suffix as parts of one
``asarm.text`` markup (no markup string is composed), so the library, the CLI and the server
check texts, choose hole lengths and lay out rows with the same functions
(``asarm.text.read_markup``, ``asarm.text.plan_rows``).
"""

from __future__ import annotations

from ..errors import InputError
from ..text import Markup, hole, read_markup


def completion_markup(model, tokenizer, body, max_length: int) -> Markup:
    """prompt [+ hole + suffix]: without a suffix the hole continues the prompt for max_tokens
    tokens; with one, its length is ``hole_length`` or chosen from the posterior over
    1..min(max_tokens, max_hole)."""
    guided = any(getattr(body, f, None) is not None for f in ("guided_regex", "guided_choice", "guided_json"))
    if body.suffix is None:
        if body.hole_length is not None:
            raise InputError("hole_length goes with a suffix; without one, max_tokens is the length")
        # a guided continuation has the lengths its constraint admits, up to max_tokens
        parts = [body.prompt, hole(1, min(body.max_tokens, body.max_hole)) if guided else body.max_tokens]
    else:
        middle = body.hole_length or hole(1, min(body.max_tokens, body.max_hole))
        parts = [body.prompt, middle, body.suffix]
    return read_markup(model, parts, tokenizer, max_hole=body.max_hole, max_length=max_length)


def hole_info(plan) -> list[dict]:
    """{"start", "length", "probability"} of every hole of a planned row, in text order
    (probability None for a given length)."""
    return [{"start": start, "length": end - start, "probability": None if c.method == "given" else c.probability}
            for (start, end), c in zip(plan.spans, plan.lengths)]
