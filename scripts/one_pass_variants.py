"""Alternative proposal policies for one-pass ASSD rounds, measured against the shipped one.

    python scripts/one_pass_variants.py [--chunks 60] [-k 5] [--model asarm-en-small]

After a rejection at draft j, a one-pass round needs proposals for the positions after j
without another pass. Every policy below keeps sampling exact (a proposal may be any
distribution the draft is drawn from); they differ only in acceptance, measured here as passes
per token on the first WikiText-2 test chunks (128 tokens, 95% hidden; the eval protocol):

  keep          (shipped) the untested drafts, then the bonus query and the lookahead queries
  draft-pass    no proposals after a rejection: the next round starts with a self-draft pass
  redraw        redraw positions j+1.. from this pass's verification queries (which saw the
                rejected draft), then the bonus and lookahead queries
  k-lookahead   k lookahead queries instead of k - 1

Each policy is a ``Proposer`` (the seam in ``asarm.sampling.proposers``), registered under its
own draft name for the run (``asarm.sampling.config.PROPOSERS``).
"""

from __future__ import annotations

import argparse

import torch

import asarm
from asarm.evaluation import wikitext
from asarm.sampling import draw
from asarm.sampling.config import PROPOSERS, ProposerInfo
from asarm.sampling.proposers import Block, OnePassDraft


class DraftPassAfterRejection(OnePassDraft):
    def carry(self, view, leftover, checked, extra):
        return None if leftover is not None else super().carry(view, leftover, checked, extra)


class RedrawAfterRejection(OnePassDraft):
    def carry(self, view, leftover, checked, extra):
        if leftover is None:
            return super().carry(view, leftover, checked, extra)
        u = torch.rand(len(checked), generator=view.generator, dtype=torch.float64)
        redrawn = Block(draw(checked, u.to(checked.device)).tolist(), checked)
        return super().carry(view, redrawn, checked, extra)


class KLookahead(OnePassDraft):
    def oracle_extras(self, view, block):
        return True, view.block_size


POLICIES = {"keep": OnePassDraft, "draft-pass": DraftPassAfterRejection, "redraw": RedrawAfterRejection,
            "k-lookahead": KLookahead}


def passes_per_token(model, examples, k: int, name: str) -> float:
    nfe = tokens = 0
    for e in examples:
        res = asarm.sample(model, torch.tensor(e.ids), torch.tensor(e.hidden), method="assd", draft=name, k=k,
                           seed=e.index)
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
    for name, policy in POLICIES.items():
        PROPOSERS[f"one-pass-{name}"] = ProposerInfo(policy, f"one-pass {name}")  # the draft name selects it
        ppt = passes_per_token(model, examples, args.k, f"one-pass-{name}")
        print(f"{name:12s} {ppt:.3f} passes per token", flush=True)


if __name__ == "__main__":
    main()
