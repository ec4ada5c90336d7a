r"""How the server lays out a request's holes. The markup is ``asarm.text``'s (one parser for
the library, the CLI and the server): ``[MASK:n]`` is a hole of exactly n tokens, ``[MASK:a-b]``
one of a to b tokens, ``[MASK]`` one of 1 to ``max_hole`` tokens, ``\[`` a literal bracket, and a
space before a hole moves into it (word boundaries as the tokenizer draws them). Lengths that
are not fixed come from ``asarm.text.choose_plan`` (the model's length posterior: exact, jointly
for several holes), drawn per choice from its seed.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import InputError
from ..text import Markup, choose_plan, escape_markup, hole_spans, read_markup


@dataclasses.dataclass
class Layout:
    """One row's tokens: ids, hidden mask and where its holes are."""
    input_ids: torch.Tensor     # [L]
    masked: torch.Tensor        # [L] bool
    holes: list[dict]           # {"start", "length", "probability"} per hole, in text order
    space_moved: bool = False   # the first hole holds the space that ended the text before it


def completion_markup(model, tokenizer, body, max_length: int) -> Markup:
    """prompt [+ hole + suffix]: without a suffix the hole continues the prompt for max_tokens
    tokens; with one, its length is ``hole_length`` or chosen from the posterior over
    1..min(max_tokens, max_hole)."""
    if body.suffix is None:
        if body.hole_length is not None:
            raise InputError("hole_length goes with a suffix; without one, max_tokens is the length")
        hole, suffix = f"[MASK:{body.max_tokens}]", ""
    else:
        n = body.hole_length
        hole = f"[MASK:{n}]" if n is not None else f"[MASK:1-{min(body.max_tokens, body.max_hole)}]"
        suffix = escape_markup(body.suffix)
    return read_markup(model, escape_markup(body.prompt) + hole + suffix, tokenizer, max_hole=body.max_hole,
                       max_length=max_length)


def plan_layouts(model, markup: Markup, seeds: list[int], *, greedy: bool, temperature: float,
                 length_prior=None) -> list[Layout]:
    """One layout per choice: its holes' lengths drawn from the posterior with the choice's seed
    (``length_prior``: weights of lengths 1, 2, ...; None is uniform)."""
    layouts = []
    for seed in seeds:
        plan = choose_plan(model, markup, length_prior=length_prior, greedy=greedy, temperature=temperature, seed=seed)
        holes = [{"start": start, "length": end - start,
                  "probability": None if c.method == "given" else c.probability}
                 for (start, end), c in zip(hole_spans(plan, markup), plan.lengths)]
        layouts.append(Layout(plan.input_ids, plan.masked, holes, bool(markup.shifted and markup.shifted[0])))
    return layouts
