"""The settled-text frontier: which text of a row being filled is final, left to right.

ASSD may decode tokens out of order (a random order, holes filled side by side), and a
byte-level model may draw half of a multi-byte character before its other half. So a streamed
text grows only at its frontier: the known prefix of the region, decoded once it does not end
inside a character. ``asarm.text.stream_infill`` and the server's streams both use this one class.
"""

from __future__ import annotations

from ..tokenization import decode, settled_text


class SettledText:
    """The text of tokens ``[start, end)`` of one row (``ids``, ``known`` per position) that is
    final so far. ``drop_space``: the region follows text that ended in a space and that space
    moved into the region; the reader already has it, so the region's text starts after it."""

    def __init__(self, tokenizer, ids: list[int], known: list[bool], start: int = 0, end: int | None = None,
                 drop_space: bool = False):
        self.tokenizer, self.ids, self.known = tokenizer, ids, known
        self.start, self.end = start, len(ids) if end is None else end
        self.drop_space = drop_space
        self.base = decode(tokenizer, ids[:start])
        self.frontier, self.emitted = start, 0

    def apply(self, positions: list[int], tokens: list[int]) -> str:
        """Take newly decoded tokens; returns the text that became final (often "")."""
        for pos, tok in zip(positions, tokens):
            self.ids[pos], self.known[pos] = int(tok), True
        f = self.frontier
        while f < self.end and self.known[f]:
            f += 1
        if f == self.frontier:
            return ""
        self.frontier = f
        text = self.text(f)
        if text is None:  # a character split across tokens: wait for the rest
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def finish(self, ids: list[int]) -> str:
        """The region's whole final text, from the finished row's ``ids``; what ``apply`` has
        not returned yet is its tail, ``finish(ids)[emitted:]``."""
        self.ids = ids
        return self.text(self.end)

    def text(self, end: int) -> str | None:
        """The region's text up to token ``end``; None while it ends inside a character."""
        text = settled_text(self.tokenizer, self.ids[:end], complete=end >= self.end)
        if text is None:
            return None
        text = text[len(self.base):]
        return text[1:] if self.drop_space and text.startswith(" ") else text
