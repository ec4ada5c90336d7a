"""Alternative proposal policies for one-pass ASSD rounds, measured against the shipped one.

    python scripts/one_pass_variants.py [--chunks 60] [-k 5] [--model asarm-en-small]

After a rejection at draft j, a one-pass round needs proposals for the positions after j
without another pass. Every policy below keeps sampling exact (a proposal may be any
distribution the draft is drawn from); they differ only in acceptance, measured here as passes
per token on the first WikiText-2 test chunks (128 tokens, 95% hidden; the eval protocol):

  keep          (shipped) the untested drafts, then the bonus query and the lookahead queries
  draft-pass    no proposals: the next round starts with a self-draft pass
  redraw        redraw positions j+1.. from this pass's oracle queries (which saw the rejected draft)
  skip          position j+1 from an extra query per draft that sees the drafts before it but not it
  k-lookahead   (full accept) k lookahead queries instead of k - 1

The experiments patch ``asarm.sampling._Row`` in this process only.
"""

from __future__ import annotations

import argparse

import torch

import asarm
from asarm import sampling
from asarm.evaluation import wikitext

Row = sampling._Row
SHIPPED = {name: getattr(Row, name) for name in ("plan", "consume", "_queue_next")}


def consume_keeping_probs(self, probs):
    self.pass_probs = probs
    return SHIPPED["consume"](self, probs)


def queue_draft_pass(self, queue, rejected_at, later, plan):
    if rejected_at is None:
        SHIPPED["_queue_next"](self, queue, rejected_at, later, plan)


def queue_redraw(self, queue, rejected_at, later, plan):
    if rejected_at is None:
        return SHIPPED["_queue_next"](self, queue, rejected_at, later, plan)
    verify = [d for d in queue if not d.exact]
    after = sum(1 for d in queue[rejected_at + 1 :] if not d.exact)  # verification rows after j
    rows = list(self.pass_probs[len(verify) - after : len(verify)])
    if plan["extended"]:
        rows.append(later[0])
    rows += list(later[1 : 1 + plan["n_lookahead"]])
    for p in rows[: min(self.k, self.m - self.n)]:
        self.queue.append(sampling._Draft(sampling._draw(p, self.generator), p, exact=False))


def plan_with_skips(self, cached):
    contents, queries = SHIPPED["plan"](self, cached)
    plan = self.last_plan
    plan["skip_rows"] = {}
    if plan.get("kind") == "oracle":
        n, n_verify = self.n, sum(1 for d in self.queue if not d.exact)
        for i, d in enumerate(self.queue):
            if not d.exact and n + i + 1 < self.m:
                plan["skip_rows"][i] = len(queries) - n_verify  # index in `later`
                queries = queries + [(self.order[n + i + 1], n + 1 + i)]
    return contents, queries


def queue_skip(self, queue, rejected_at, later, plan):
    if rejected_at is None:
        return SHIPPED["_queue_next"](self, queue, rejected_at, later, plan)
    j = rejected_at
    proposals = [(None, later[plan["skip_rows"][j]])] if j in plan["skip_rows"] else []
    proposals += [(d.token, d.probs) for d in queue[j + 2 :]]
    if plan["extended"] and j + 1 < len(queue):
        proposals.append((None, later[0]))
    proposals += [(None, p) for p in later[1 : 1 + plan["n_lookahead"]]]
    for token, p in proposals[: min(self.k, self.m - self.n)]:
        self.queue.append(sampling._Draft(sampling._draw(p, self.generator) if token is None else token, p, exact=False))


def plan_k_lookahead(self, cached):
    contents, queries = SHIPPED["plan"](self, cached)
    plan = self.last_plan
    if plan.get("kind") == "oracle" and plan["extended"]:
        n, b = self.n, len(self.queue)
        start = n + b + 1 + plan["n_lookahead"]
        extra = min(self.k, self.m - (n + b + 1)) - plan["n_lookahead"]
        queries = queries + [(self.order[start + j], n + b + 1) for j in range(max(extra, 0))]
        plan["n_lookahead"] += max(extra, 0)
    return contents, queries


POLICIES = {
    "keep": {},
    "draft-pass": {"_queue_next": queue_draft_pass},
    "redraw": {"consume": consume_keeping_probs, "_queue_next": queue_redraw},
    "skip": {"plan": plan_with_skips, "_queue_next": queue_skip},
    "k-lookahead": {"plan": plan_k_lookahead},
}


def passes_per_token(model, examples, k: int) -> float:
    nfe = tokens = 0
    for e in examples:
        res = asarm.sample(model, torch.tensor(e.ids), torch.tensor(e.hidden), method="assd", k=k,
                           one_pass=True, seed=e.index)
        nfe += int(res.nfe)
        tokens += sum(e.hidden)
    return nfe / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="asarm-en-small")
    p.add_argument("--chunks", type=int, default=60)
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = asarm.load_model(args.model, device="cpu")
    examples = wikitext.WikiTextTask(model, length=128, evaluator="self").examples(args.chunks)
    print(f"{args.model}, first {len(examples)} WikiText-2 test chunks, 95% hidden, one-pass ASSD, k = {args.k}")
    for name, patches in POLICIES.items():
        for attr, fn in SHIPPED.items():
            setattr(Row, attr, patches.get(attr, fn))
        try:
            print(f"{name:12s} {passes_per_token(model, examples, args.k):.3f} passes per token", flush=True)
        finally:
            for attr, fn in SHIPPED.items():
                setattr(Row, attr, fn)


if __name__ == "__main__":
    main()
