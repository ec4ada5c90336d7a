"""The one-line-of-Python constraint of the constrained HumanEval evaluation: the token automaton
built directly (``line_automaton``) accepts exactly the texts its regex (``line_regex``) matches."""

from __future__ import annotations

import random
import re

import pytest

from asarm.evaluation.python_line import line_automaton, line_regex, line_shape

PIECES = ["    ", "  ", " ", "x", "y1", "(", ")", "[", "]", "{", "}", "'", '"', "\\", ":", "#", "\n", "=", ",", "\t",
          "if", "é"]
# single characters and a few multi-character tokens, so a token can cross a bracket or a quote
VOCAB = {i: p.encode() for i, p in enumerate(sorted({chr(c) for c in range(32, 127)} | {"\t", "\n", "é", "    ", "):",
                                                                                          "('", "x)\n", "y1"}))}
CONTEXTS = [
    ("def f(x):\n", "    return x\n"),  # after a block opener: deeper, any line
    ("def f(x):\n    if x:\n        y = 1\n", "    return y\n"),  # one of the enclosing levels
    ("def f(x):\n    y = 1\n", "        return y\n"),  # the suffix is deeper: the line opens a block
]


def tokens_of(text: str) -> list[int]:
    """Greedy longest-match tokenization over VOCAB (some texts have several; any one will do)."""
    by_bytes = {b: i for i, b in VOCAB.items()}
    data, out = text.encode(), []
    while data:
        size = max(n for n in range(1, len(data) + 1) if data[:n] in by_bytes)
        out.append(by_bytes[data[:size]])
        data = data[size:]
    return out


@pytest.mark.parametrize("prefix, suffix", CONTEXTS)
def test_automaton_accepts_what_the_regex_matches(prefix, suffix):
    rng = random.Random(len(prefix))
    automaton = line_automaton(prefix, suffix, VOCAB, len(VOCAB) + 1)
    pattern = re.compile(line_regex(prefix, suffix))
    accepted = 0
    texts = [" " * indent + "x = (y1, ['a', {x: 1}])" + (":" if opens else "") + "  # c\n"
             for indent, opens in line_shape(prefix, suffix).items()]
    noise = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 10))) for _ in range(1500)]
    texts += noise + [" " * 4 + t for t in noise] + [" " * 8 + t + "\n" for t in noise]
    texts += [" " * 4 + t.replace("\n", "") + ":\n" for t in noise]
    for text in texts:
        expected = bool(pattern.fullmatch(text))
        assert automaton.accepts(tokens_of(text)) == expected, (text, expected)
        accepted += expected
    assert accepted > 20  # the random texts do reach both answers


def test_shape_follows_the_context():
    assert line_shape("def f(x):\n", "    return x\n") == {2: True, 4: False, 8: False}
    assert line_shape("def f(x):\n    y = 1\n", "        return y\n") == {4: True}
    assert line_shape("def f(x):\n    if x:\n        y = 1\n", "") == {4: False, 8: False}
