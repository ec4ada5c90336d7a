"""``asarm eval rocstories|humaneval-infilling --hole-length posterior|fixed``: infilling without
the oracle hole length.

For every example the hole's true middle is removed and its length chosen four ways, each
decoded greedily (ASSD self-draft, k=5: exactly the greedy chain) with the same context:

- ``oracle``: the true length (what the paper's protocol hands the sampler);
- ``fixed``: the mean token length of the evaluated examples' true middles, rounded (a
  baseline that peeks at the test answers' mean, as issue 13 defines it);
- ``prior-mode``: the most likely length under the learned length prior alone;
- ``posterior/<factorization>/<prior>``: the argmax of ``asarm.lengths``' exact posterior for
  both factorizations, with a uniform prior over the candidates and with the learned prior.

Learned priors never see a test answer: ROCStories uses the token lengths of all five
sentences of the Story Cloze stories *after* the evaluated ones (1,000 on; the protocol evaluates
at most the first 1,000), HumanEval the token lengths of the non-blank lines of the code model's
training data (the Python standard library without tests), both with add-one smoothing over
the candidates. The context is trimmed (``fit_infill``) so that the longest candidate fits, the
same context for every way of choosing the length.

Records (one JSON line per example, resumable; shard ``i/n`` takes the examples whose index is
``i`` mod ``n`` into ``records.shard-i-of-n.jsonl``, and every run and the report read all the
folder's record files, so shards run side by side and an unsharded rerun finishes what is left)
keep both factorizations' evidence
log-likelihoods for every candidate, so posterior accuracy under any prior is recomputed from
them: exact-length rate, mean absolute error and mean posterior probability of the true length.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..lengths import FACTORIZATIONS, evidence_log_likelihoods, posterior_from_evidence, prior_from_counts
from .common import RECORD_GLOB, Example, RecordWriter, batch_seed, fit_infill, pad_batch, read_records, records_path

PRIORS = ("uniform", "learned")
MAX_LENGTH = {"rocstories": 32, "humaneval-infilling": 48}
PRIOR_STORIES_FROM = 1000


def mode_names() -> list[str]:
    return ["oracle", "fixed", "prior-mode"] + [f"posterior/{f}/{p}" for f in FACTORIZATIONS for p in PRIORS]


# --- the pieces of each example and the learned priors ---------------------------------------------
def example_pieces(task) -> list[tuple[list[int], list[int], list[int], dict]]:
    """(prefix ids, true middle ids, suffix ids, info) for the task's examples, untrimmed."""
    from ..tokenization import encode

    tok = task.tokenizer
    if task.name == "rocstories":
        from .rocstories import read_stories, split_story

        out = []
        for st in read_stories(task.path)[: task.stories]:
            p, m, s = split_story(st["sentences"])
            out.append((encode(tok, p), encode(tok, m), encode(tok, s), {"id": st["id"], "reference": st["sentences"][2].strip()}))
        return out
    from .humaneval import read_problems

    return [(encode(tok, pr["prompt"]), encode(tok, pr["canonical_solution"]), encode(tok, pr["suffix"]),
             {"id": pr["task_id"], "problem": pr}) for pr in read_problems(task.path)]


def learned_prior_counts(task, max_len: int) -> tuple[list[int], str]:
    """Histogram (index n-1 = length n) of lengths from data disjoint from the test answers."""
    from ..lengths import length_counts, text_units

    if task.name == "rocstories":
        from .rocstories import read_stories

        stories = read_stories(task.path)[PRIOR_STORIES_FROM:]
        texts = [" " + s.strip() for st in stories for s in st["sentences"]]
        source = f"{task.path}: the {len(stories)} stories from {PRIOR_STORIES_FROM} on, all five sentences"
    else:
        from ..data import read_documents

        texts = [line for doc in read_documents("python-stdlib", kind="code") for line in text_units(doc, "line")]
        source = f"python-stdlib (the code model's training data): {len(texts)} non-blank lines"
    counts, _ = length_counts(task.tokenizer, texts, max_len)
    return counts, source


# --- one example -------------------------------------------------------------------------------------
def choose(loglik: dict, prior: list[float], max_len: int, fits: list[bool]) -> dict:
    """Posterior argmax length for each factorization x prior."""
    out = {}
    for f in FACTORIZATIONS:
        for name in PRIORS:
            post = posterior(loglik[f], prior if name == "learned" else None, fits)
            out[f"posterior/{f}/{name}"] = int(torch.argmax(post)) + 1
    return out


def posterior(loglik: list[float], prior: list[float] | None, fits: list[bool]) -> torch.Tensor:
    """The length posterior from recorded evidence (``asarm.lengths.posterior_from_evidence``)."""
    ll = torch.tensor(loglik, dtype=torch.float64)
    lp = torch.zeros_like(ll) if prior is None else torch.tensor(prior, dtype=torch.float64).log()
    return posterior_from_evidence(ll, lp, torch.tensor(fits))


def run_example(task, model, index, pieces, lengths_wanted, max_len, seed, prior) -> dict:
    """Evidence for every candidate, greedy fills for each distinct chosen length, their metrics."""
    from ..sampling import sample

    p, m, s, info = pieces
    limit = model.config.max_length
    room = max(max_len, len(m), *lengths_wanted.values())
    p, s, ok = fit_infill(p, [0] * room, s, limit)
    if not ok:
        raise InputError(f"example {index}: no room for a {room}-token hole within the model's limit")
    cands = [(n,) for n in range(1, max_len + 1)]
    loglik = {f: evidence_log_likelihoods(model, [p, s], cands, factorization=f).tolist() for f in FACTORIZATIONS}
    fits = [limit is None or len(p) + len(s) + n <= limit for n in range(1, max_len + 1)]
    lengths_wanted = {**lengths_wanted, **choose(loglik, prior, max_len, fits)}
    distinct = sorted(set(lengths_wanted.values()))
    examples = [Example(index, info["id"], p + m_ + s, [False] * len(p) + [True] * len(m_) + [False] * len(s), info)
                for m_ in ([0] * n for n in distinct)]
    ids, masked, att = pad_batch(examples, model.config.mask_token_id, model.config.mask_token_id)
    dev = model.device
    res = sample(model, ids.to(dev), masked.to(dev), attention_mask=att.to(dev), method="assd", draft="self", k=5,
                 greedy=True, seed=batch_seed(seed, index))
    outputs = [res.input_ids[b, : len(e.ids)].tolist() for b, e in enumerate(examples)]  # .tolist(): on the host
    generated = [[t for t, h in zip(o, e.hidden) if h] for o, e in zip(outputs, examples)]
    metrics = task.score(examples, outputs, generated)
    keep = ("rouge1", "rouge2", "rougeL", "passed", "status", "output", "exact_match")
    fills = {str(n): {k: v for k, v in mm.items() if k in keep} for n, mm in zip(distinct, metrics)}
    return {"index": index, "id": info["id"], "true_length": len(m), "context_tokens": len(p) + len(s),
            "candidates": [1, max_len], "fits": fits, "loglik": loglik, "lengths": lengths_wanted, "fills": fills}


# --- the run -------------------------------------------------------------------------------------------
def run(task, model, *, out_dir, limit=None, seed=0, progress=True, model_name=None, shard=(0, 1)) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_len = MAX_LENGTH[task.name]
    pieces = example_pieces(task)[: limit or None]
    prior_path = out_dir / "prior.json"
    if prior_path.is_file():
        prior_info = json.loads(prior_path.read_text())
    else:
        counts, source = learned_prior_counts(task, max_len)
        prior_info = {"counts": counts, "source": source, "smoothing": "add-one", "max_length": max_len}
        _write_atomically(prior_path, json.dumps(prior_info) + "\n")  # shards side by side may both write it
    prior = prior_from_counts(prior_info["counts"])  # add-one smoothing
    fixed = round(sum(len(x[1]) for x in pieces) / len(pieces))  # over all examples, whichever the shard
    prior_mode = max(range(max_len), key=lambda i: prior[i]) + 1
    meta = {"task": task.name, "settings": task.settings(), "model": model_name, "seed": seed, "examples": len(pieces),
            "fixed_length": fixed, "prior_mode": prior_mode, "decoding": "greedy (ASSD self-draft k=5)",
            "candidates": [1, max_len], "modes": mode_names()}
    _write_atomically(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    done = {int(r["index"]) for r in read_records(sorted(out_dir.glob(RECORD_GLOB)))}
    mine = [i for i in range(len(pieces)) if i % shard[1] == shard[0] and i not in done]
    writer = RecordWriter(records_path(out_dir, shard))
    try:
        for n, i in enumerate(mine):
            start = time.perf_counter()
            rec = run_example(task, model, i, pieces[i], {"oracle": len(pieces[i][1]), "fixed": fixed,
                                                          "prior-mode": prior_mode}, max_len, seed, prior)
            rec["elapsed_s"] = time.perf_counter() - start
            rec["device"] = str(model.device)
            writer.write([rec])
            if progress:
                print(f"{task.name} example {i} ({n + 1}/{len(mine)} left in this run) {rec['elapsed_s']:.1f}s",
                      file=sys.stderr, flush=True)
    finally:
        writer.close()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
