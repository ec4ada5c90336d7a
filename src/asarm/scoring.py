"""Parallel joint density estimation: log p(x_hidden | x_visible) in ONE pass per row.

An AS-ARM evaluates a whole chain of conditionals at once (docs/design.md, "Rank structure"): with ranks fixed by the
order, the query stream at each hidden position gives p(x_sigma_i | visible, x_sigma_<i), and
their sum is the exact log-likelihood of the chain that the samplers draw from.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .errors import InputError
from .ranks import decoding_order, ranks_from_order
from .sampling import TargetDistribution, check_inputs, check_temperature, resolve_seed, row_orders, row_seed


@dataclasses.dataclass
class ScoreResult:
    log_prob: torch.Tensor  # [B] (scalar for [L] input): sum over hidden positions, in nats
    token_log_probs: torch.Tensor  # [B, L]: log p of each hidden token given its chain prefix; 0 elsewhere
    num_tokens: torch.Tensor  # [B] hidden tokens scored
    nfe: int  # network passes used (one for the whole batch)

    @property
    def nll_per_token(self) -> torch.Tensor:
        return -self.log_prob / self.num_tokens.clamp(min=1)

    @property
    def perplexity(self) -> torch.Tensor:
        return torch.exp(self.nll_per_token)


@torch.no_grad()
def score(model, input_ids: torch.Tensor, masked: torch.Tensor, *, order="left-to-right",
          temperature: float = 1.0, attention_mask: torch.Tensor | None = None,
          seed: int | None = None) -> ScoreResult:
    """Exact chain log-likelihood of the hidden tokens given the visible ones, mask token
    excluded from every softmax as in sampling. ``order`` as in ``sample``; "random" draws each
    row's order from ``seed``. ``temperature`` scores the tempered chain."""
    check_inputs(model, input_ids, masked, attention_mask, score_hidden=True)
    check_temperature(temperature)
    squeeze = input_ids.dim() == 1
    ids = input_ids.view(1, -1).cpu().long() if squeeze else input_ids.cpu().long()
    hid = masked.view(1, -1).cpu() if squeeze else masked.cpu()
    B, L = ids.shape
    valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.view(B, L).cpu().bool()
    hid = hid & valid
    if bool((ids[hid] == model.config.mask_token_id).any()):
        raise InputError("a hidden position holds the mask token: score needs the real tokens at hidden positions")
    seed = resolve_seed(seed)
    ranks = torch.stack([
        ranks_from_order(L, decoding_order(hid[b], o, torch.Generator().manual_seed(row_seed(seed, b))),
                         int(valid[b].sum()))
        for b, o in enumerate(row_orders(order, B))
    ])
    ids_dev = ids.to(model.device)
    logits, query_pos, query_valid = model.chain_logits(ids_dev, ranks.to(model.device))
    target = TargetDistribution(model.config.mask_token_id, float(temperature))
    logp = torch.log_softmax(target.logits(logits), -1).double()
    picked = logp.gather(-1, ids_dev.gather(1, query_pos)[..., None]).squeeze(-1)
    picked = torch.where(query_valid, picked, torch.zeros_like(picked)).cpu()
    token_log_probs = torch.zeros(B, L, dtype=torch.float64)
    token_log_probs.scatter_(1, query_pos.cpu(), picked)
    token_log_probs[~hid] = 0.0
    result = ScoreResult(token_log_probs.sum(1), token_log_probs, hid.sum(1), nfe=1)
    if squeeze:
        result.log_prob, result.token_log_probs, result.num_tokens = result.log_prob[0], token_log_probs[0], result.num_tokens[0]
    return result


# --- command line: text with the scored spans marked [[like this]] -----------------------------


def _find_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every ``[[...]]`` span, in one pass (a regex that retries from every
    ``[[`` was quadratic: 50,000 unclosed ``[[`` took 70 s)."""
    spans, position = [], 0
    while (start := text.find("[[", position)) >= 0:
        end = text.find("]]", start + 2)
        if end < 0:
            raise InputError(f"unclosed [[ at character {start}: close the scored span with ]] "
                             "(spans are written [[like this]])")
        nested = text.find("[[", start + 2, end)
        if nested >= 0:
            raise InputError(f"unclosed or nested [[ at character {start}: spans are written [[like this]], "
                             "one at a time")
        spans.append((start, end + 2))
        position = end + 2
    return spans


def parse_scored_text(tokenizer, text: str):
    """Split text into tokens and a mask of the spans to score (``[[...]]``). Without any span
    the whole text is scored (nothing visible: its unconditional chain likelihood).

    With tokenizers that attach a word's leading space to the word, one space right before a
    span belongs to the span, so ``the [[mat]]`` and ``the[[ mat]]`` both score " mat". An
    ``[[`` without its closing ``]]`` is an error."""
    from .text import space_joins_next_word
    from .tokenization import encode

    spans = _find_spans(text)
    if not spans:
        ids = encode(tokenizer, text)
        return torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool)
    shift = space_joins_next_word(tokenizer)
    ids, hidden = [], []
    last = 0
    for start, end in spans:
        before, inside = text[last:start], text[start + 2:end - 2]
        if shift and before.endswith(" ") and inside[:1] not in ("", " "):
            before, inside = before[:-1], " " + inside
        before_ids, inside_ids = encode(tokenizer, before), encode(tokenizer, inside)
        if not inside_ids:
            raise InputError("an empty [[ ]] span has nothing to score")
        ids += before_ids + inside_ids
        hidden += [False] * len(before_ids) + [True] * len(inside_ids)
        last = end
    tail = encode(tokenizer, text[last:])
    ids += tail
    hidden += [False] * len(tail)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(hidden, dtype=torch.bool)


def cmd_score(args) -> int:
    from .cli_args import load_cli_model, read_text
    from .tokenization import decode

    model = load_cli_model(args)
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer files; score token ids with asarm.score() instead")
    ids, hidden = parse_scored_text(model.tokenizer, read_text(args))
    if len(ids) == 0:
        raise InputError("nothing to score: the text is empty")
    order = args.order if args.order in ("left-to-right", "random") else [int(x) for x in args.order.split(",")]
    res = score(model, ids, hidden, order=order, seed=args.seed)
    n = int(res.num_tokens)
    nll = -float(res.log_prob)
    print(f"tokens scored: {n}")
    print(f"total NLL: {nll:.4f} nats ({nll / math.log(2):.4f} bits)")
    print(f"NLL per token: {nll / max(n, 1):.4f} nats; perplexity: {math.exp(nll / max(n, 1)):.3f}")
    if args.tokens:
        for pos in torch.nonzero(hidden).flatten().tolist():
            piece = decode(model.tokenizer, [int(ids[pos])])
            print(f"{pos:6d} {-float(res.token_log_probs[pos]):9.4f}  {piece!r}")
    return 0


def add_cli(sub) -> None:
    from .cli_args import add_model_arguments

    p = sub.add_parser("score", help="exact log-likelihood of [[marked]] spans given the rest, in one pass",
                       description="Score the spans written [[like this]] given the rest of the text (the "
                                   "whole text if none is marked): total and per-token NLL, perplexity.")
    p.add_argument("text", nargs="?", help="text, or '-' for standard input")
    p.add_argument("--file", default=None)
    p.add_argument("--order", default="left-to-right", help="left-to-right, random or comma-separated positions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", action="store_true", help="also print every scored token's NLL")
    add_model_arguments(p)
    p.set_defaults(func=cmd_score)
