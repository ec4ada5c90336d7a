"""``infill`` and ``stream_infill``: fill the holes of a marked-up text with the model."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..tokenization import decode_text
from .constraints import constrain_markup, hole_constraints
from .plan import InfillPlan, exclude_special_tokens, plan_rows, read_markup
from .stream import SettledText


def infill(model, text: str, tokenizer=None, return_result: bool = False, *, max_hole: int | None = None,
           length_prior=None, factorization: str | None = None, stop_at: str | None = None,
           allow_special: bool = False, constraints: dict | None = None, **sample_options):
    """Fill every hole of ``text`` with the model; returns the whole filled text.

    ``tokenizer`` defaults to ``model.tokenizer`` (attached by ``asarm.load_model``).
    ``sample_options`` go to ``asarm.sampling.sample`` (method, draft, k, temperature, order,
    cache, seed, ...). Holes of unknown length (``[MASK]``, ``[MASK:a-b]``): ``max_hole`` caps
    ``[MASK]`` (default 32), ``length_prior`` weights the lengths (None: uniform; a dict
    {length: weight}, a sequence of weights for lengths 1, 2, ... or a callable),
    ``factorization`` picks the length evidence (``asarm.lengths``; default: the model's
    config ``asarm_length_factorization``, else "left-given-right"), ``stop_at`` cuts a
    final hole at a string. Special tokens that are not text (``<unk>``, padding, ``<s>``, ...;
    ``asarm.tokenization.special_text_ids``) and end-of-text (unless ``stop_at`` is given) are
    excluded inside the target distribution, so the sampler stays exact for the model restricted
    to text; ``allow_special=True`` keeps them.
    ``constraints``: {hole index (text order): spec}, a spec being ``{"regex": ...}``,
    ``{"choice": [...]}`` or ``{"json_schema": {...}}`` for the hole's own text (its leading
    space included); every output matches, and the sampler is exact for the locally
    renormalized chain (``asarm.text.constraints``, docs/constraints.md).
    Invalid UTF-8 byte runs a byte-level model may sample are dropped from the returned text
    (``asarm.tokenization.decode_text``). With ``return_result=True`` returns ``(text, result)``, where
    ``result`` has ``.input_ids``, ``.nfe``, ``.rounds``, ``.accepted`` and ``.lengths`` (how
    each hole's length was chosen, with its posterior probability).
    """
    from .. import sampling

    plan = prepare(model, text, tokenizer, sample_options, max_hole=max_hole, length_prior=length_prior,
                   factorization=factorization, stop_at=stop_at, allow_special=allow_special,
                   constraints=constraints)
    result = sampling.sample(model, plan.input_ids, plan.masked, **sample_options)
    result.lengths = plan.lengths
    filled = finish_text(plan, result.input_ids)
    return (filled, result) if return_result else filled


def stream_infill(model, text: str, on_text, tokenizer=None, progress: bool = False, allow_special: bool = False,
                  *, max_hole=None, length_prior=None, factorization=None, stop_at=None, constraints=None,
                  **sample_options):
    """Like ``infill``, but calls ``on_text(piece)`` as the text fills in: each piece extends
    the part of the text that is final, left to right (tokens decoded out of order appear once
    everything before them is known; ``asarm.text.stream``). Returns ``(text, result)``.

    With ``progress`` a progress bar over the hidden tokens goes to stderr.
    """
    from .. import sampling

    if stop_at is not None:
        raise InputError("stop_at does not combine with streaming")
    plan = prepare(model, text, tokenizer, sample_options, max_hole=max_hole, length_prior=length_prior,
                   factorization=factorization, allow_special=allow_special, constraints=constraints)
    settled = SettledText(plan.tokenizer, plan.input_ids.tolist(), (~plan.masked).tolist())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(plan.masked.sum()), unit="tok", leave=False)

    def on_tokens(row, positions, tokens):
        if bar is not None:
            bar.update(len(positions))
        piece = settled.apply(positions, tokens)
        if piece:
            on_text(piece)

    on_tokens(0, [], [])  # the text before the first hole is final from the start
    try:
        result = sampling.sample(model, plan.input_ids, plan.masked, callback=on_tokens, **sample_options)
        result.lengths = plan.lengths
    finally:
        if bar is not None:
            bar.close()
    filled = fill_text(plan.tokenizer, result.input_ids)
    if len(filled) > settled.emitted:
        on_text(filled[settled.emitted:])
    return filled, result


def prepare(model, text, tokenizer, sample_options: dict, *, max_hole=None, length_prior=None,
            factorization=None, stop_at=None, allow_special=False, constraints=None) -> InfillPlan:
    """The text's row (``read_markup`` then ``plan_rows``, with the decoding's temperature and
    greedy flag for the length evidence), and ``sample_options`` completed in place with the
    row's seed, unless ``allow_special`` the excluded special tokens, and the row's
    ``constraints`` (compiled, with the holes' candidate lengths restricted to admissible ones;
    every check runs before any network pass)."""
    config = sample_options.get("config")
    temperature = config.temperature if config is not None else sample_options.get("temperature", 1.0)
    greedy = config.greedy if config is not None else sample_options.get("greedy", False)
    markup = read_markup(model, text, tokenizer, max_hole=max_hole, stop_at=stop_at)
    automata = constrain(model, markup, constraints, sample_options)
    [plan] = plan_rows(model, markup, [sample_options.get("seed")], length_prior=length_prior,
                       factorization=factorization, temperature=temperature, greedy=greedy)
    sample_options["seed"] = plan.seed
    if not allow_special:
        exclude_special_tokens(plan.tokenizer, sample_options, keep_end_of_text=stop_at is not None)
    if automata:
        sample_options["constraints"] = hole_constraints(plan.spans, automata)
    return plan


def constrain(model, markup, constraints, sample_options: dict) -> dict:
    """``constrain_markup`` with the tokens the row's target excludes anyway (the mask token,
    ``suppress``) left out of the automata, so a mask never loses all its tokens."""
    if not constraints:
        if constraints is not None and not isinstance(constraints, dict):
            raise InputError(f"constraints must be an object {{hole index: spec}}, got {type(constraints).__name__}")
        return {}
    config = sample_options.get("config")
    excluded = set(sample_options.get("suppress", config.suppress if config is not None else ()))
    excluded.add(model.config.mask_token_id)
    return constrain_markup(markup, constraints, model.config.vocab_size, excluded)


def fill_text(tokenizer, input_ids) -> str:
    """Decode a whole (filled) sequence, [L] or [1, L], with the exact decoder (invalid UTF-8 byte
    runs dropped: ``asarm.tokenization.decode_text``)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise InputError(f"fill_text decodes one sequence, got a batch of {input_ids.shape[0]}")
            input_ids = input_ids[0]
        input_ids = input_ids.tolist()
    return decode_text(tokenizer, input_ids)


def finish_text(plan: InfillPlan, filled_ids) -> str:
    """The filled row's text; with ``stop_at``, the last hole cut at its first stop string."""
    ids = filled_ids.view(-1).tolist()
    if plan.stop_at is None:
        return fill_text(plan.tokenizer, ids)
    hole = decode_text(plan.tokenizer, ids[plan.stop_start:])
    cut = hole.find(plan.stop_at)
    return decode_text(plan.tokenizer, ids[:plan.stop_start]) + (hole if cut < 0 else hole[:cut])
