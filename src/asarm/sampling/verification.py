"""The speculative verify step: pure, batched, on the model's device.

For each row b with ``n_drafts[b]`` = γ drafts d_1..d_γ, drawn from proposals p_i (p_i may depend
on the drafts before it), and the target conditionals q_i of the same positions (each given the
drafts before it), one of two verifiers decides how many drafts to keep (τ) and draws the next
token Y. Both are exact; the block verifier never keeps fewer tokens on average.

**Token by token** (Leviathan et al. 2023; Chen et al. 2023):

    accept d_i with probability min(1, q_i(d_i) / p_i(d_i)), left to right;
    at the first rejection j draw the replacement from normalize(max(0, q_j - p_j));
    if every draft is accepted, the next token is the bonus draw from ``bonus_probs`` (if given).

Accepting with min(1, q/p) and resampling from the residual yields exactly q at each position,
whatever p is, which is why every proposer and variant in this package draws the same joint.

**Block verification** (Sun, Mendlovic, Leviathan, Aharoni, Beirami, Ro, Suresh, "Block
Verification Accelerates Speculative Decoding", ICLR 2025) judges the block as a whole. With
P(x^i) = prod_{l<=i} p_l(x_l) and Q(x^i) = prod_{l<=i} q_l(x_l) for a prefix x^i of the block:

    weights   w_0 = 1,  w_i = min(1, w_{i-1} q_i(d_i) / p_i(d_i))          (i = 1..γ)
    residual  rho_i = sum_x max(0, w_i q_{i+1}(x) - p_{i+1}(x))            (i = 0..γ-1)
    keep      h_i = rho_i / (rho_i + 1 - w_i) for 1 <= i < γ,   h_γ = w_γ
    τ = the LARGEST i in 1..γ with η_i < h_i (independent uniforms η_i), else 0;
    keep d_1..d_τ; Y ~ normalize(max(0, w_τ q_{τ+1} - p_{τ+1})) if τ < γ,
                   Y ~ q_{γ+1} (the bonus) if τ = γ (no Y without a bonus query).

Token-wise verification is the same with w_i replaced by 1 in the residual and the first failure
stopping the scan; block verification keeps a prefix that a later success "vouches for" even
when one of its tokens would have been rejected on its own, and its residual is the scaled one.

*Why it is exact.* Let A(x^i) = Pr(τ >= i, d^i = x^i) (the drafts' first i tokens are x^i and
all of them are kept). Claim 1: A(x^i) = w_i(x^i) P(x^i). For i = γ it is P(x^γ) h_γ. Going
down, with β = Pr(τ >= i+1 | d^i = x^i) = sum_x p_{i+1}(x) min(1, w_i q_{i+1}(x)/p_{i+1}(x))
= sum_x min(p_{i+1}(x), w_i q_{i+1}(x)) (Claim 1 at i+1), and τ >= i iff τ >= i+1 or η_i < h_i:
Pr(τ >= i | x^i) = β + (1 - β) h_i, and since w_i - β = rho_i and 1 - β = rho_i + 1 - w_i, the
choice of h_i makes it w_i. (Where 1 - β = 0 the value of h_i does not matter; we use 1.)
Hence Pr(τ = i, d^i = x^i) = P(x^i)(w_i - β) = P(x^i) rho_i, and the kept prefix followed by Y
puts mass P(x^i) max(0, w_i q_{i+1}(y) - p_{i+1}(y)) on (x^i, y).
Claim 2: with the positions after Y drawn from the target (the next rounds), the output's first
i tokens equal x^i with probability Q(x^i). Split it as A(x^i) + C(x^i), C = the ways in which
τ < i. Induction, C(x^0) = 0 = Q - w_0 P: if C(x^i) = Q(x^i) - w_i P(x^i), then
C(x^{i+1}) = C(x^i) q_{i+1}(y) + P(x^i) max(0, w_i q_{i+1}(y) - p_{i+1}(y))
           = Q(x^{i+1}) - P(x^i) min(p_{i+1}(y), w_i q_{i+1}(y)) = Q(x^{i+1}) - w_{i+1} P(x^{i+1}).
So A + C = Q for every prefix up to γ, and position γ+1 gets q_{γ+1} whether it comes from Y
(τ = γ) or from the continuation. Nothing here asks p_i to be close to q_i, nor the p_i to be
conditioned on each other, so every proposer's blocks can be verified this way.

What may not be reused: after a block verdict the drafts past τ + 1 were looked at (τ is a
maximum over all positions), so unlike token-wise verification they are no longer draws from
their proposals. A proposer that carries them into the next block must draw them again
(``OnePassDraft.carry``). The proposal distributions themselves stay valid.

Block verification never keeps fewer drafts in expectation than token-wise verification with
the same drafts: token by token keeps x^i with probability P(x^i) prod_l min(1, q_l/p_l), and
w_i >= that product term by term (each suffix product of ratios is at least the product of the
ratios capped at 1); Sun et al. show no valid verifier keeps more. It costs one [B, K-1, V]
buffer and a few vector operations more per verify pass.
"""

from __future__ import annotations

import dataclasses

import torch

from . import target as _target


@dataclasses.dataclass
class Verdict:
    n_accepted: torch.Tensor  # [B] drafts accepted (<= n_drafts)
    next_token: torch.Tensor  # [B] replacement at the first rejection, else the bonus token, else -1
    next_prob: torch.Tensor  # [B] its target probability (q_j(replacement) or the bonus probability)
    draft_target_prob: torch.Tensor  # [B, K] q_i(d_i): each draft's target probability


def _at(probs: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """probs[b, rows[b, i], tokens[b, i]] as float64 [B, K], without copying whole rows."""
    B, R, V = probs.shape
    return probs.reshape(B, R * V).gather(1, rows * V + tokens).double()


def _rows(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """probs[b, rows[b, i]] [B, K, V] in the dtype of ``probs``: whole-row copies (index_select),
    many times faster than a gather with an expanded index on the CPU."""
    B, R, V = probs.shape
    flat = rows if B == 1 else torch.arange(B, device=rows.device)[:, None] * R + rows
    return probs.reshape(B * R, V).index_select(0, flat.reshape(-1)).view(B, rows.shape[1], V)


def _row(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """probs[b, rows[b]] as float64 [B, V]."""
    B, R, V = probs.shape
    flat = rows if B == 1 else torch.arange(B, device=rows.device) * R + rows
    return probs.reshape(B * R, V).index_select(0, flat).double()


def token_accepts(p: torch.Tensor, q: torch.Tensor, u_accept: torch.Tensor, n_drafts: torch.Tensor) -> torch.Tensor:
    """Token-by-token verdict: the length of the prefix of drafts whose tests u_i p_i(d_i) <= q_i(d_i)
    all pass. p, q: [B, K] each draft's proposal and target probability. (Padding past n_drafts
    may pass or fail: the prefix is capped at n_drafts.)"""
    return torch.minimum((u_accept * p <= q).cumprod(-1).sum(-1), n_drafts)


def block_weights(p: torch.Tensor, q: torch.Tensor, n_drafts: torch.Tensor) -> torch.Tensor:
    """w_0..w_K [B, K+1]: w_i = min(1, w_{i-1} q_i(d_i)/p_i(d_i)), i.e. the smallest product of
    ratios over the block's suffixes ending at i (the empty one gives 1). Computed as
    exp(S_i - max_{j<=i} S_j) with S the running sum of log ratios, so a zero target
    probability (log 0 = -inf) stays exactly 0 from there on and greedy one-hots give exact 0/1."""
    ks = torch.arange(p.shape[1], device=p.device)
    real = (ks[None] < n_drafts[:, None]) & (p > 0)  # p > 0 for every real draft: it was drawn from p
    log_ratio = torch.where(real, q.log() - p.log(), torch.zeros_like(p))
    running = torch.cat([torch.zeros_like(p[:, :1]), log_ratio.cumsum(-1)], dim=1)
    return (running - running.cummax(-1).values).exp()


def block_accepts(p: torch.Tensor, q: torch.Tensor, draft_next: torch.Tensor, target_next: torch.Tensor,
                  u_accept: torch.Tensor, n_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block verdict: (τ [B], the number of drafts kept; w_τ [B], the scale of the target in the
    residual the next token is drawn from). p, q [B, K]: each draft's proposal and target
    probability; ``draft_next``, ``target_next`` [B, K-1, V]: p_{i+1} and q_{i+1}, the
    distributions at the position after each prefix i = 1..K-1 (draft index 1..K-1);
    ``u_accept`` [B, K]: η_1..η_K. The rule and its proof: module docstring.

    rho is summed in float64 from differences taken in the probabilities' own dtype (float32
    for the model's): each term's relative error is ~1e-7, far below anything a test of the
    distribution can see, and the [B, K, V] work stays in one float32 pass."""
    B, K = p.shape
    weights = block_weights(p, q, n_drafts)
    kept = torch.arange(1, K + 1, device=p.device)  # candidate prefix lengths i = 1..K
    w = weights[:, 1:]  # w_i
    excess = (w[:, :-1, None].to(target_next.dtype) * target_next).sub_(draft_next)  # one [B, K-1, V] buffer
    rho = excess.clamp_(min=0.0).sum(-1, dtype=torch.float64)
    rho = torch.cat([rho, torch.zeros_like(w[:, :1])], dim=1)  # rho_K: only used past the block
    denominator = rho + 1.0 - w
    h = torch.where(denominator > 0, rho / denominator.clamp(min=1e-300), torch.ones_like(w))
    h = torch.where(kept[None] == n_drafts[:, None], w, h)  # the whole block: h_γ = w_γ
    h = torch.where(kept[None] > n_drafts[:, None], torch.zeros_like(h), h)  # padding is never kept
    tau = ((u_accept < h).long() * kept[None]).amax(-1)
    return tau, weights.gather(1, tau[:, None]).squeeze(1)


def verify(draft_tokens, draft_probs, target_probs, n_drafts, u_accept, u_next, *, target_rows=None,
           exact=None, bonus_probs=None, has_bonus=None, block=None, bonus_rows=None) -> Verdict:
    """draft_tokens [B, K]; draft_probs [B, K, V]; target_probs [B, K, V], or [B, Q, V] with
    ``target_rows`` [B, K] naming the row that holds each draft's target (so a pass's query
    distributions are used in place); n_drafts [B]; u_accept [B, K], u_next [B]: uniforms in
    [0, 1). ``exact`` [B, K]: drafts drawn from their exact conditional (target = proposal; no
    target row is read for them). ``bonus_probs`` [B, V]: the next position's distribution, or
    ``bonus_rows`` [B]: the row of ``target_probs`` that holds it; drawn where every draft is
    accepted and ``has_bonus`` [B] (default all) is True. ``block`` [B] bool: rows verified as a
    block (default none: token by token). Entries past ``n_drafts[b]`` are padding and are
    ignored. Probabilities may be float32 or float64; the arithmetic is float64."""
    B, K = draft_tokens.shape
    ks = torch.arange(K, device=draft_tokens.device)
    if target_rows is None:
        target_rows = ks.expand(B, K)
    p = _at(draft_probs, ks.expand(B, K), draft_tokens)
    q = _at(target_probs, target_rows, draft_tokens)
    if exact is not None:
        q = torch.where(exact, p, q)
    n_accepted = token_accepts(p, q, u_accept, n_drafts)
    q_scale = None  # w_τ [B, 1] of block rows: the residual's target scale (1 token by token)
    if block is not None:  # (the engine passes None when no row asks for it: no device sync here)
        draft_next = draft_probs[:, 1:]
        target_next = _rows(target_probs, target_rows[:, 1:])
        if exact is not None and bool(exact[:, 1:].any()):  # (self-drafts: only the first draft is exact)
            target_next = torch.where(exact[:, 1:, None], draft_next.to(target_next.dtype), target_next)
        tau, w_tau = block_accepts(p, q, draft_next, target_next, u_accept, n_drafts)
        n_accepted = torch.where(block, tau, n_accepted)
        q_scale = torch.where(block, w_tau, torch.ones_like(w_tau))[:, None]
    rejected = n_accepted < n_drafts

    # Y: at a rejection (j = τ) from the residual normalize(max(0, w_τ q_j - p_j)) (w = 1 token by
    # token); after a full accept from the bonus distribution, written as the residual against a
    # zero proposal (bonus - 0 = bonus, so both draws are one ``draw`` over one [B, V] buffer)
    j = n_accepted.clamp(max=K - 1)
    target_j = target_rows.gather(1, j[:, None]).squeeze(1)
    if bonus_rows is not None:  # the bonus is a row of target_probs: one row read per batch row
        q_next = _row(target_probs, torch.where(rejected, target_j, bonus_rows))
    else:
        q_next = _row(target_probs, target_j)
        if bonus_probs is not None:
            q_next = torch.where(rejected[:, None], q_next, bonus_probs.double())
    has_next = rejected
    if bonus_rows is not None or bonus_probs is not None:
        has_next = rejected | (torch.ones_like(rejected) if has_bonus is None else has_bonus)
        p_next = _row(draft_probs, j).mul_(rejected[:, None])
    else:
        p_next = _row(draft_probs, j)
    if q_scale is not None:
        q_scale = torch.where(rejected[:, None], q_scale, torch.ones_like(q_scale))
    next_token = _target.draw(_target.residual(q_next if q_scale is None else q_scale * q_next, p_next), u_next)
    next_token = torch.where(has_next, next_token, torch.full_like(next_token, -1))
    next_prob = q_next.gather(-1, next_token.clamp(min=0)[:, None]).squeeze(-1)
    return Verdict(n_accepted, next_token, next_prob, q)


# --- multi-draft verification -----------------------------------------------------------------
@dataclasses.dataclass
class TreeVerdict:
    """One multi-draft row's verdict (host values)."""

    branch: int  # the continuation whose drafts were kept (-1: none, the next token replaces them)
    n_accepted: int  # drafts kept, the shared exact first one included
    next_token: int  # the replacement at a rejection, the bonus token, or -1
    next_prob: float  # its target probability
    draft_target_prob: list[float]  # each kept draft's target probability


def recursive_rejection(target: torch.Tensor, proposal: torch.Tensor, candidates: list[int], uniforms: list[float],
                        renormalize: bool = True) -> tuple[int, torch.Tensor]:
    """Pick among ``candidates``, independent draws from ``proposal`` [V], so that the token kept
    follows ``target`` [V] (Yang et al. 2024, "Multi-candidate speculative decoding"; SpecInfer's
    multi-step speculative sampling with one draft distribution): candidate j is accepted with
    probability min(1, r_j(c_j) / proposal(c_j)), where r_1 = target and, after each rejection,
    r_{j+1} = normalize(max(0, r_j - proposal)). Returns (the accepted candidate's index, or -1
    with the last residual to draw the token from instead).

    Why exact: one candidate of this loop is ordinary speculative sampling of r_j with draft
    ``proposal``: it returns a token distributed as r_j, split into "accepted c_j" and "rejected,
    then a draw from r_{j+1}". Unrolling, a draw from r_{j+1} may be replaced by the next
    candidate's test, because that candidate is a fresh draw from ``proposal`` independent of
    what came before. ``renormalize=False`` is the negative control of the tests (the residual
    left unnormalized: later candidates are accepted too rarely)."""
    residual_probs = target.double()
    proposal = proposal.double()
    for j, (token, u) in enumerate(zip(candidates, uniforms)):
        if u * float(proposal[token]) <= float(residual_probs[token]):
            return j, residual_probs
        rest = _target.residual(residual_probs, proposal)
        residual_probs = rest / rest.sum() if renormalize else rest
    return -1, residual_probs


def verify_tree(trunk_probs: list[float], candidates: list[int], proposal: torch.Tensor, target: torch.Tensor,
                chains: list[tuple], uniforms: list[float]) -> TreeVerdict:
    """A multi-draft round after its trunk (exact drafts, kept as they are, with target
    probabilities ``trunk_probs``; none in one-pass rounds): ``candidates`` are the
    continuations' drafts at the next position, drawn
    independently from ``proposal`` [V], checked against ``target`` [V] by recursive rejection;
    the chosen continuation's later drafts are then checked token by token. ``chains``: per
    continuation (drafts after its first, their proposals [m, V], their targets [m, V], the
    bonus distribution [V] or None). ``uniforms``: one per continuation, one per later draft,
    one for the next token.

    Exact: the token kept at the branch position follows ``target`` (``recursive_rejection``);
    given it, the chosen continuation's later drafts were drawn from their proposals given that
    token alone (the choice looked only at the branch position's drafts and the picking
    uniforms), so token-by-token verification of them is exact as in a one-chain round."""
    n = len(candidates)
    picked, rest = recursive_rejection(target, proposal, candidates, uniforms[:n])
    u_next = torch.tensor(uniforms[-1], dtype=torch.float64, device=target.device)
    if picked < 0:
        token = int(_target.draw(rest, u_next))
        return TreeVerdict(-1, len(trunk_probs), token, float(target[token]), list(trunk_probs))
    drafts, draft_probs, target_probs, bonus = chains[picked]
    kept = [*trunk_probs, float(target[candidates[picked]])]
    for i, token in enumerate(drafts):
        p, q = float(draft_probs[i, token]), float(target_probs[i, token])
        if uniforms[n + i] * p > q:
            replacement = int(_target.draw(_target.residual(target_probs[i].double(), draft_probs[i].double()), u_next))
            return TreeVerdict(picked, len(kept), replacement, float(target_probs[i, replacement]), kept)
        kept.append(q)
    if bonus is None:
        return TreeVerdict(picked, len(kept), -1, 0.0, kept)
    token = int(_target.draw(bonus, u_next))
    return TreeVerdict(picked, len(kept), token, float(bonus[token]), kept)
