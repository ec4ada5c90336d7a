"""Held-out loss/perplexity of a checkpoint under the paper's order (fixed masks from a seed).

    python scripts/heldout_loss.py MODEL SOURCE [SOURCE ...] [--kind text|code] [--seq-len 128]
        [--max-chunks 512] [--hidden 0.85 0.99] [--seed 1234] [--max-chars N] [--unigram-fit SOURCE]

MODEL: shipped name or HF-format directory; SOURCE: anything ``asarm.data`` reads (files, folders,
.zip/.gz/.jsonl, ``python-stdlib-tests``). Prints one JSON line: mean cross-entropy per hidden token
(nats), its perplexity, the number of hidden tokens scored. With ``--unigram-fit SOURCE`` also the
perplexity of a unigram model of the same tokens (counts from SOURCE, add-one smoothing) on the
same chunks and the ratio of the two: the hidden positions are a uniform random subset of each
chunk, so the unigram cross-entropy over every token of the chunks estimates it without bias.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from asarm import load_model  # noqa: E402
from asarm.train import evaluate_sources  # noqa: E402


def unigram_baseline(model, fit_source, sources, args) -> dict:
    import math

    from asarm.data import load_documents, pack, tokenize_documents

    tok, eos, vocab = model.tokenizer, model.config.eos_token_id, model.config.vocab_size
    counts = torch.ones(vocab, dtype=torch.float64)  # add-one smoothing
    for ids in tokenize_documents(tok, load_documents(fit_source, kind=args.kind)):
        counts += torch.bincount(torch.tensor(ids + [eos]), minlength=vocab).double()
    log_p = (counts / counts.sum()).log()
    docs = load_documents(sources, kind=args.kind, max_chars=args.max_chars)
    chunks = pack(tokenize_documents(tok, docs), args.seq_len, eos)[: args.max_chunks].long()
    nll = -log_p[chunks.reshape(-1)].mean().item()
    return {"unigram_fit": fit_source, "unigram_loss": nll, "unigram_perplexity": math.exp(nll)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("sources", nargs="+")
    p.add_argument("--kind", default="text", choices=["text", "code"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-chunks", type=int, default=512)
    p.add_argument("--hidden", type=float, nargs=2, default=[0.85, 0.99], metavar=("LOW", "HIGH"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-chars", type=int, default=None, help="read at most this many characters")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unigram-fit", default=None, metavar="SOURCE", help="fit a unigram baseline on SOURCE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")  # one load for the chain loss and the unigram baseline
    res = evaluate_sources(model, args.sources, kind=args.kind, seq_len=args.seq_len,
                           max_chunks=args.max_chunks, seed=args.seed, low=args.hidden[0], high=args.hidden[1],
                           max_chars=args.max_chars)
    if args.unigram_fit:
        res.update(unigram_baseline(model, args.unigram_fit, args.sources, args))
        res["ratio_to_unigram"] = res["unigram_perplexity"] / res["ppl"]
    res["model"] = args.model
    res["sources"] = args.sources
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
