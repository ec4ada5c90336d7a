"""Per-hole constraints from a person: a regex, a list of choices or a JSON schema, compiled to
token automata over a tokenizer (``asarm.sampling.constraints.TokenAutomaton``).

A constraint is on the hole's own text, its leading space included (the space before a hole
moves into it: ``"is [MASK:1]"`` with ``{"choice": [" red", " blue"]}``). Specs:

    {"regex": r" ?\\d{4}"}                 the hole's text matches the regex (in full)
    {"choice": [" red", " blue"]}          the hole's text is one of these strings
    {"json_schema": {...}}                 the hole's text is a JSON value of this schema

Compiled with ``outlines-core`` (chosen by measurement, docs/constraints.md: it exposes the
token-level automaton itself, which the exact-length completability needs), and cached per
(spec, tokenizer, excluded tokens). Regexes use the syntax of Rust's ``regex`` crate (what
outlines-core compiles), which agrees with Python's ``re`` on the common constructs.
"""

from __future__ import annotations

import json
import threading
import weakref

from ..errors import InputError
from ..sampling.constraints import HoleConstraint, TokenAutomaton

KINDS = ("regex", "choice", "json_schema")
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")
_END_MARK, _END_MARK_REGEX = "\ufdd0", "\\x{FDD0}"  # see compile_regex

_lock = threading.Lock()
_bytes_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {id: bytes}
_automata: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {key: TokenAutomaton}


def escape_regex(text: str) -> str:
    """``text`` as a literal in the regex syntax outlines-core compiles."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def normalize_spec(spec, where: str = "constraint") -> tuple[str, str]:
    """(kind, canonical value) of a user's spec, or an InputError that says what is wrong."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise InputError(f"{where}: give exactly one of {', '.join(repr(k) for k in KINDS)}, "
                         f"e.g. {{\"regex\": \" ?\\\\d{{4}}\"}}; got {spec!r:.200}")
    kind, value = next(iter(spec.items()))
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: a regex must be a non-empty string, got {value!r:.200}")
        return kind, value
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise InputError(f"{where}: choice must be a non-empty list of non-empty strings, got {value!r:.200}")
        return kind, json.dumps(list(value))
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: json_schema is not valid JSON ({exc})") from None
    if not isinstance(value, (dict, bool)):
        raise InputError(f"{where}: json_schema must be a JSON schema object, got {value!r:.200}")
    return kind, json.dumps(value, sort_keys=True)


def spec_regex(kind: str, value: str, where: str = "constraint") -> str:
    """The regex a (normalized) spec stands for."""
    if kind == "regex":
        return value
    if kind == "choice":
        return "(" + "|".join(escape_regex(c) for c in json.loads(value)) + ")"
    from outlines_core.json_schema import build_regex_from_schema

    try:  # JSON allows whitespace before a value: one space, the one a hole takes over from the text
        return "[ ]?(?:" + build_regex_from_schema(value) + ")"
    except Exception as exc:  # outlines-core raises its own error types for unsupported schemas
        raise InputError(f"{where}: cannot use this JSON schema ({exc})") from None


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The text each token id adds to a hole, as bytes (a word's leading space included; a
    byte-level token's raw bytes, even when they are part of a UTF-8 character). Special tokens
    and tokens that add no text are left out: a constrained hole never holds them."""
    with _lock:
        cached = _bytes_cache.get(tokenizer)
    if cached is not None:
        return cached
    from ..tokenization import special_text_ids

    backend = getattr(tokenizer, "backend_tokenizer", None)
    special = set(special_text_ids(tokenizer))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        special.add(int(eos))
    if backend is not None:
        special |= {int(i) for i in backend.get_added_tokens_decoder()}
        size = backend.get_vocab_size(with_added_tokens=True)
        piece_of = backend.id_to_token
        decoder = type(backend.decoder).__name__ if backend.decoder is not None else ""
    else:
        size, decoder = len(tokenizer), ""
        piece_of = lambda i: tokenizer.convert_ids_to_tokens(i)  # noqa: E731
    byte_of = None
    if decoder == "ByteLevel":
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    out: dict[int, bytes] = {}
    for i in range(size):
        if i in special:
            continue
        piece = piece_of(i)
        if piece is None:
            continue
        if byte_of is not None:
            if any(c not in byte_of for c in piece):
                continue
            data = bytes(byte_of[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            data = bytes([int(piece[3:5], 16)])
        else:
            data = piece.replace("\u2581", " ").encode("utf-8")
        if data:
            out[i] = data
    with _lock:
        _bytes_cache[tokenizer] = out
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE (as in transformers, without
    importing it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def compile_spec(spec, tokenizer, vocab_size: int, excluded=(), where: str = "constraint") -> TokenAutomaton:
    """The token automaton of a user's spec over ``tokenizer`` (ids < ``vocab_size``, none of
    ``excluded``), cached per (spec, tokenizer, vocab_size, excluded)."""
    kind, value = normalize_spec(spec, where)
    key = (kind, value, int(vocab_size), tuple(sorted(set(excluded))))
    with _lock:
        per_tokenizer = _automata.setdefault(tokenizer, {})
        automaton = per_tokenizer.get(key)
    if automaton is not None:
        return automaton
    automaton = compile_regex(spec_regex(kind, value, where), token_bytes(tokenizer), vocab_size, set(excluded),
                              where=where, description=f"{kind} {value[:80]}")
    with _lock:
        per_tokenizer[key] = automaton
    return automaton


def compile_regex(regex: str, vocabulary: dict[int, bytes], vocab_size: int, excluded=frozenset(), *,
                  where: str = "constraint", description: str = "") -> TokenAutomaton:
    """The token automaton of ``regex`` (matched in full) over ``vocabulary`` (id -> bytes)."""
    from outlines_core import Index, Vocabulary

    groups: dict[bytes, list[int]] = {}
    for i, data in vocabulary.items():
        if i < vocab_size and i not in excluded:
            groups.setdefault(data, []).append(i)
    if not groups:
        raise InputError(f"{where}: the tokenizer has no text tokens to fill the hole with")
    # outlines-core 0.2 drops a one-byte token's move out of an accepting state into a
    # non-accepting one (its DFA flags matches one byte late), so the regex is compiled with an
    # end marker: no state of the text is accepting, every move is kept, and the accepting
    # states are those where the marker (a token of its own) may follow. The marker is a Unicode
    # noncharacter, so a hole never holds it.
    marker, eos = vocab_size, vocab_size + 1
    groups[_END_MARK.encode("utf-8")] = [marker]
    try:
        index = Index(f"(?:{regex}){_END_MARK_REGEX}", Vocabulary(eos, groups))
    except Exception as exc:  # ValueError for a bad regex; other types from the Rust side
        message = str(exc)
        if "regex" in message.lower() or "NFA" in message or "DFA" in message or "parse" in message.lower():
            raise InputError(f"{where}: invalid regex {regex!r:.200} ({message})") from None
        raise InputError(f"{where}: no text of the tokenizer's tokens matches {regex!r:.200} ({message})") from None
    moves = index.get_transitions()
    finals = {s for s, m in moves.items() if marker in m}
    transitions = {s: {t: n for t, n in m.items() if t < vocab_size} for s, m in moves.items()}
    return TokenAutomaton(index.get_initial_state(), transitions, finals, vocab_size, description)


def parse_constraints(constraints, n_holes: int) -> dict[int, dict]:
    """{hole index: spec} from a user's ``constraints`` (keys: hole indices in text order, ints
    or their decimal strings, as JSON objects have them)."""
    if constraints is None:
        return {}
    if not isinstance(constraints, dict):
        raise InputError(f"constraints must be an object {{hole index: spec}}, e.g. {{0: {{\"regex\": \"\\\\d+\"}}}}; "
                         f"got {type(constraints).__name__}")
    out = {}
    for key, spec in constraints.items():
        index = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            index = int(key)
        if isinstance(index, bool) or not isinstance(index, int):
            raise InputError(f"constraints: keys are hole indices (0, 1, ...), got {key!r}")
        if not 0 <= index < n_holes:
            raise InputError(f"constraints: the text has no hole {index} (it has {n_holes}: "
                             f"{', '.join(map(str, range(n_holes)))})")
        if index in out:
            raise InputError(f"constraints: hole {index} is given twice")
        normalize_spec(spec, f"constraint on hole {index}")
        out[index] = spec
    return out


def constrain_markup(markup, constraints, vocab_size: int, excluded=()) -> dict[int, TokenAutomaton]:
    """Compile ``constraints`` for a ``Markup`` (asarm.text.plan) and restrict each constrained
    hole's candidate lengths to those its constraint admits (in place): a given length no text
    of that many tokens can match, or an unknown length with no admissible candidate, is an
    InputError. Returns {hole index: automaton}."""
    specs = parse_constraints(constraints, len(markup.candidates))
    automata = {}
    for index, spec in sorted(specs.items()):
        where = f"constraint on hole {index}"
        automaton = compile_spec(spec, markup.tokenizer, vocab_size, excluded, where)
        lengths = markup.candidates[index]
        admitted = [n for n in lengths if automaton.admits(n)]
        if not admitted:
            span = f"{lengths[0]} tokens" if len(lengths) == 1 else f"{lengths[0]} to {lengths[-1]} tokens"
            raise InputError(f"{where}: no text of {span} matches it "
                             f"({automaton.description}); change the hole's length or the constraint")
        markup.candidates[index] = admitted
        automata[index] = automaton
    return automata


def hole_constraints(spans, automata: dict[int, TokenAutomaton]) -> list[HoleConstraint]:
    """The sampler's ``HoleConstraint``s of a laid-out row (``InfillPlan.spans``)."""
    return [HoleConstraint(spans[i][0], spans[i][1], automaton) for i, automaton in sorted(automata.items())
            if spans[i][1] > spans[i][0]]
