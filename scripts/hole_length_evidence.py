"""Is there any information about the hole length in a model's evidence? Two checks on the records
of ``--hole-length posterior`` runs, no model needed (issue 13's "measurements that say why"):

1. **A prior fitted to the model.** The evidence p(context | n) can carry a systematic trend in
   n (relative-position effects) that hides a per-example signal. Fit free log-weights w(n) so
   that softmax(evidence + w) gives the true lengths of one half of the examples the highest
   likelihood (L-BFGS, a tiny L2 term), and measure the other half (2-fold, both ways,
   averaged). The control is the same fit with the evidence left out (the half's own length
   histogram, held out on the other half): if the evidence held per-example information, the
   fitted posterior would put more mass on the true length than that control.
2. **The posterior median.** The argmax (what greedy decoding takes) is not the choice that
   minimises the absolute length error; the posterior's median is. Its MAE, beside the median
   of the learned prior alone, and the fixed mean length.

    python scripts/hole_length_evidence.py results/hole-length/<run> [...] [--out results/hole-length/evidence.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from asarm.evaluation.common import RECORD_GLOB, read_records  # noqa: E402
from asarm.lengths import FACTORIZATIONS, prior_from_counts  # noqa: E402


def evidence(recs: list[dict], fact: str) -> torch.Tensor:
    """[examples, candidates] log-likelihoods, lengths that do not fit at -inf."""
    ll = torch.tensor([r["loglik"][fact] for r in recs], dtype=torch.float64)
    fits = torch.tensor([r["fits"] for r in recs])
    return torch.where(fits, ll, torch.full_like(ll, -torch.inf))


def fit_log_weights(ll: torch.Tensor, true_len: torch.Tensor) -> torch.Tensor:
    """w maximising the mean log posterior probability of the true lengths under softmax(ll + w)."""
    keep = true_len <= ll.shape[1]
    ll, target = ll[keep], true_len[keep] - 1
    w = torch.zeros(ll.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        lp = torch.log_softmax(ll + w, 1)
        loss = -lp[torch.arange(len(target)), target].mean() + 1e-3 * (w ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def p_true(post: torch.Tensor, true_len: torch.Tensor) -> float:
    inside = true_len <= post.shape[1]
    idx = (true_len - 1).clamp(max=post.shape[1] - 1)
    return float(torch.where(inside, post[torch.arange(len(true_len)), idx], torch.zeros(len(true_len),
                                                                                        dtype=post.dtype)).mean())


def median(post: torch.Tensor) -> torch.Tensor:
    return (post.cumsum(-1) < 0.5).sum(-1) + 1


def analyse(folder: Path) -> dict:
    by_index = {int(r["index"]): r for r in read_records(sorted(folder.glob(RECORD_GLOB)))}
    recs = [by_index[i] for i in sorted(by_index)]
    true_len = torch.tensor([r["true_length"] for r in recs])
    prior = torch.tensor(prior_from_counts(json.loads((folder / "prior.json").read_text())["counts"]), dtype=torch.float64)
    fixed = round(float(true_len.double().mean()))
    out = {"folder": str(folder), "examples": len(recs), "uniform_p_true": 1 / len(prior),
           "fixed_length": fixed, "fixed_mae": float((true_len - fixed).abs().double().mean()),
           "learned_prior_p_true": p_true(prior.expand(len(recs), -1), true_len),
           "learned_prior_median_mae": float((median(prior) - true_len).abs().double().mean()), "factorizations": {}}
    halves = (torch.arange(len(recs)) % 2 == 0, torch.arange(len(recs)) % 2 == 1)
    for fact in FACTORIZATIONS:
        ll = evidence(recs, fact)
        fitted_p, fitted_mae, control_p = [], [], []
        for train, test in (halves, halves[::-1]):
            w = fit_log_weights(ll[train], true_len[train])
            post = torch.softmax(ll[test] + w, 1)
            fitted_p.append(p_true(post, true_len[test]))
            w0 = fit_log_weights(torch.zeros_like(ll[train]), true_len[train])  # no evidence: the half's histogram
            control_p.append(p_true(torch.softmax(w0, 0).expand(int(test.sum()), -1), true_len[test]))
            fitted_mae.append(float((post.argmax(1) + 1 - true_len[test]).abs().double().mean()))
        post = torch.softmax(ll + prior.log(), 1)
        out["factorizations"][fact] = {
            "fitted_prior_p_true": sum(fitted_p) / 2, "fitted_prior_argmax_mae": sum(fitted_mae) / 2,
            "fitted_without_evidence_p_true": sum(control_p) / 2,
            "learned_prior_posterior_median_mae": float((median(post) - true_len).abs().double().mean()),
            "learned_prior_posterior_argmax_mae": float((post.argmax(1) + 1 - true_len).abs().double().mean()),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = [analyse(Path(f)) for f in args.folders]
    lines = ["| run | factorization | p(true): uniform / learned prior / fitted without evidence / fitted with "
             "evidence (2-fold) | MAE: fixed / "
             "prior median / posterior argmax / posterior median |", "|---|---|---|---|"]
    for r in results:
        for fact, f in r["factorizations"].items():
            lines.append(f"| {Path(r['folder']).name} ({r['examples']}) | {fact} | {r['uniform_p_true']:.3f} / "
                         f"{r['learned_prior_p_true']:.3f} / {f['fitted_without_evidence_p_true']:.3f} / "
                         f"{f['fitted_prior_p_true']:.3f} | {r['fixed_mae']:.2f} / "
                         f"{r['learned_prior_median_mae']:.2f} / {f['learned_prior_posterior_argmax_mae']:.2f} / "
                         f"{f['learned_prior_posterior_median_mae']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python scripts/hole_length_evidence.py " + " ".join(sys.argv[1:]),
                                              "runs": results, "table": lines}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
