"""The text interface: holes to fill and spans to score, written in the text, turned into rows.

    markup.py  ``[MASK…]`` holes and ``[[…]]`` spans, escapes, the one word-boundary rule
    plan.py    encode and check a text, choose its holes' lengths, lay out its rows
    stream.py  the settled-text frontier of a row being filled
    infill.py  ``infill`` and ``stream_infill``

See ``asarm.text.markup`` for the markup and docs/design.md, "Text a person reads", for the
rules between the model and the text.
"""

from .infill import fill_text, finish_text, infill, stream_infill
from .markup import Hole, escape_markup, hole, parse_markup, parse_scored_text, space_joins_next_word, split_markup
from .plan import (InfillPlan, Markup, assemble, choose_plan, exclude_special_tokens, non_text_ids, parse_infill,
                   plan_rows, read_markup, text_only)
from .stream import SettledText

__all__ = ["infill", "stream_infill", "fill_text", "finish_text", "Hole", "hole", "parse_markup", "escape_markup",
           "split_markup", "parse_scored_text", "space_joins_next_word", "InfillPlan", "Markup", "assemble",
           "choose_plan", "plan_rows", "read_markup", "parse_infill", "non_text_ids", "text_only",
           "exclude_special_tokens", "SettledText"]
