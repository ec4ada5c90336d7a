"""A regex for "one syntactically plausible line of Python" at a hole between two code contexts.

Used by the constrained HumanEval single-line evaluation (scripts/constrained_humaneval.py,
results/constrained/README.md) as the hole's constraint: the hole's text is a whole line (its
indentation and its closing newline included). What the regex says, from the context only (never
from the reference line):

- indentation: after a block opener (the previous non-blank line ends with ``:``) one level
  deeper than it (2, 4 or 8 more spaces); otherwise one of the indentation levels of the
  previous lines, up to the previous line's;
- the line opens a block (ends with ``:``) exactly when the next non-blank line of the suffix is
  indented deeper than the line;
- no newline inside; brackets ``() [] {}`` balanced up to ``depth`` levels of nesting; string
  literals (single- or double-quoted, with escapes) closed on the line; an optional trailing
  comment, or a line that is only a comment.

A regex cannot say more (balanced brackets of any depth, triple-quoted strings, continuation
lines are out). ``line_regex`` writes the constraint as a regex; ``line_automaton`` builds the same
language's token automaton directly: outlines-core takes over 20 s to compile a regex of nested
bracket groups (measured: two levels, untyped brackets, 21 s for any vocabulary size), while the
language is a small character automaton (a bracket stack of bounded depth, a string mode) that
is lifted to tokens here in about a second. tests/test_python_line.py checks the two agree.
"""

from __future__ import annotations

# Printable ASCII and tabs only: a negated class would stand for all of Unicode, whose UTF-8
# automaton makes compiling over a vocabulary many times slower (and HumanEval's lines are ASCII).
STRING = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"' + "|" + r"'(?:[\t -&(-\[\]-~]|\\[\t -~])*'"
PLAIN = r"[\t !$-&*-Z\\^-z|~]"  # a character outside brackets, strings and comments
FIRST = r"[!$-&*-Z\\^-z|~]"  # the line's first character after its indentation
COMMENT = r"#[\t -~]*"
DEPTH = 3  # nesting depth of brackets: 98% of HumanEval's single lines, and ~500 automaton states


def balanced(depth: int) -> str:
    """Text with brackets balanced up to ``depth`` levels and closed strings, no newline."""
    if depth == 0:
        return f"(?:{PLAIN}|{STRING})*"
    inner = balanced(depth - 1)
    return rf"(?:{PLAIN}|{STRING}|\({inner}\)|\[{inner}\]|\{{{inner}\}})*"


def statement(depth: int = DEPTH) -> str:
    """A line's text after its indentation, before an optional comment: starts with no blank."""
    inner = balanced(depth - 1)
    return rf"(?:{FIRST}|{STRING}|\({inner}\)|\[{inner}\]|\{{{inner}\}}){balanced(depth)}"


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def line_shape(prefix: str, suffix: str) -> dict[int, bool]:
    """{indentation the line may have: whether it must open a block (end with ':')}."""
    before = [line for line in prefix.split("\n") if line.strip()]
    after = [line for line in suffix.split("\n") if line.strip()]
    previous = before[-1] if before else ""
    level = indentation(previous)
    next_level = indentation(after[0]) if after else 0
    if previous.split("#")[0].rstrip().endswith(":"):
        indents = [level + step for step in (2, 4, 8)]
    else:
        indents = sorted({indentation(line) for line in before if 0 < indentation(line) <= level} | {level})
    return {indent: next_level > indent for indent in indents}


def line_regex(prefix: str, suffix: str, depth: int = DEPTH) -> str:
    """The regex of one plausible line between ``prefix`` (ending with a newline) and ``suffix``."""
    body = statement(depth)
    alternatives = []
    for indent, opens_block in line_shape(prefix, suffix).items():
        if opens_block:
            text = rf"(?:{body})?:[ \t]*(?:{COMMENT})?"
        else:
            text = rf"(?:{body}(?:{COMMENT})?|{COMMENT})"
        alternatives.append(" " * indent + text + r"\n")
    return "(?:" + "|".join(alternatives) + ")"


# --- the same language as a token automaton -------------------------------------------------------
OPENERS, CLOSERS = "([{", ")]}"
PRINTABLE = {9} | set(range(32, 127))
END = ("end",)


def _line_step(state, ch: str, shape: dict[int, bool], depth: int):
    """The character automaton of ``line_regex``: the next state, or None (no match possible).
    States: ("indent", spaces so far); ("body", must open a block, bracket stack, mode, the last
    non-blank character outside brackets was ':'), mode "" (code), a quote (in a string), a
    quote and a backslash (after an escape), "#" (in a comment); END after the newline."""
    if state[0] == "indent":
        n = state[1]
        if ch == " ":
            return ("indent", n + 1) if n + 1 <= max(shape) else None
        if n not in shape or ch in " \t\n" or ch in CLOSERS:
            return None
        if ch == "#":
            return None if shape[n] else ("body", False, (), "#", False)
        return _line_step(("body", shape[n], (), "", False), ch, shape, depth)
    if state[0] != "body":
        return None
    _, must_open, stack, mode, colon = state
    if mode == "#":
        if ch == "\n":
            return END if colon or not must_open else None
        return state
    if mode in ('"', "'"):
        if ch == "\n":
            return None
        if ch == "\\":
            return ("body", must_open, stack, mode + "\\", False)
        return ("body", must_open, stack, "" if ch == mode else mode, False)
    if mode:  # after a backslash in a string
        return None if ch == "\n" else ("body", must_open, stack, mode[0], False)
    if ch == "\n":
        return END if not stack and (colon or not must_open) else None
    if ch == "#":
        return ("body", must_open, stack, "#", colon) if not stack else None
    if ch in "\"'":
        return ("body", must_open, stack, ch, False)
    if ch in OPENERS:
        return ("body", must_open, stack + (ch,), "", False) if len(stack) < depth else None
    if ch in CLOSERS:
        if not stack or OPENERS.index(stack[-1]) != CLOSERS.index(ch):
            return None
        return ("body", must_open, stack[:-1], "", False)
    if ch in " \t":
        return state
    return ("body", must_open, stack, "", ch == ":" and not stack)


def line_automaton(prefix: str, suffix: str, vocabulary: dict[int, bytes], vocab_size: int, excluded=(),
                   depth: int = DEPTH):
    """The ``TokenAutomaton`` of ``line_regex(prefix, suffix, depth)`` over ``vocabulary`` (id ->
    bytes, ``asarm.text.constraints.token_bytes``), ids < ``vocab_size`` and not ``excluded``."""
    import numpy as np

    from ..sampling.constraints import TokenAutomaton

    shape = line_shape(prefix, suffix)
    states, index = [("indent", 0)], {("indent", 0): 0}
    rows = []
    while len(rows) < len(states):  # breadth first over the character automaton's states
        row = []
        for byte in range(256):
            nxt = _line_step(states[len(rows)], chr(byte), shape, depth) if byte in PRINTABLE | {10} else None
            if nxt is not None and nxt not in index:
                index[nxt] = len(states)
                states.append(nxt)
            row.append(-1 if nxt is None else index[nxt])
        rows.append(row)
    dead = len(states)
    table = np.array(rows + [[dead] * 256], dtype=np.int64)
    table[table < 0] = dead
    ids = [i for i in sorted(vocabulary) if i < vocab_size and i not in set(excluded)]
    by_token = np.empty((len(states) + 1, len(ids)), dtype=np.int64)  # [state, token]: the state after it
    start = np.arange(len(states) + 1)
    for column, i in enumerate(ids):
        current = start
        for byte in vocabulary[i]:
            current = table[current, byte]
        by_token[:, column] = current
    token_ids = np.array(ids)
    transitions, todo, seen = {}, [0], {0}
    while todo:  # keep the states tokens reach from the start
        s = todo.pop()
        live = by_token[s] != dead
        moves = dict(zip(token_ids[live].tolist(), by_token[s, live].tolist()))
        transitions[s] = moves
        for n in set(moves.values()) - seen:
            seen.add(n)
            todo.append(n)
    finals = {index[END]} if END in index else set()
    return TokenAutomaton(0, transitions, finals, vocab_size, description=f"python line {sorted(shape.items())}")
