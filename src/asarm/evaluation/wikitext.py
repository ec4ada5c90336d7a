"""``asarm eval wikitext``: the paper's speed/quality table (docs/design.md, "Paper results").

Protocol: the WikiText-2 test split (``--text clean``, the default: detokenized, sentences with
``<unk>`` dropped, as ``asarm.data`` reads WikiText for training; ``--text raw``: the tokenized
release as it is) is encoded line by line with the model's tokenizer and the
token stream cut into consecutive chunks of ``--length`` tokens (the last partial chunk is
dropped; chunk i is the same whatever ``--limit`` is). In each chunk round(hidden_fraction * L)
positions, drawn uniformly at random (per chunk, from ``--seed``), are hidden and re-generated,
left to right, by each decoding configuration (k = 5: sequential, ASSD self-draft, ASSD n-gram).

Reported per configuration (mean and 95% confidence interval over chunks): NFE (network passes,
draft passes included), draft calls, tokens per round, wall-clock seconds, the unigram entropy
(bits) of the generated tokens and of the whole filled chunk, and the generative perplexity of
the filled chunk under an evaluator:
- ``--evaluator NAME_OR_PATH``: any `transformers` causal LM (AutoModelForCausalLM); its
  tokenizer re-tokenizes the decoded text, a BOS token is prepended, at most its context window
  is scored; per-chunk perplexity exp(mean NLL), averaged over chunks (the paper: gpt2-large).
- ``--evaluator self``: the model's own left-to-right chain likelihood of the whole chunk with
  nothing visible (one pass, ``asarm.score``). It is NOT GPT-2 perplexity and is labelled so.
- default ``auto``: gpt2-large when it can be loaded (cached or online), else ``self`` with a
  warning; ``none`` skips the perplexity.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from ..errors import InputError
from .common import Example, example_generator, find_shared_data, open_text, unigram_entropy_bits

PAPER_EVALUATOR = "gpt2-large"
SELF_LABEL = "self-ppl (the model's own left-to-right chain likelihood, not GPT-2)"
HF_DATASET = ("wikitext", "wikitext-2-v1")


class WikiTextTask:
    name = "wikitext"

    def __init__(self, model, *, data=None, length: int | None = None, hidden_fraction: float = 0.95,
                 seed: int = 0, evaluator: str = "auto", evaluator_batch_size: int = 8, text: str = "clean"):
        if text not in ("clean", "raw"):
            raise InputError(f"--text must be clean or raw, got {text!r}")
        self.text = text
        self.model = model
        self.tokenizer = _tokenizer(model)
        max_len = model.config.max_length
        if length is None:
            length = min(512, max_len) if max_len else 512
        if length < 2:
            raise InputError(f"--length must be >= 2, got {length}")
        if max_len is not None and length > max_len:
            raise InputError(f"--length {length} is longer than the model's limit of {max_len} tokens")
        if not 0.0 < hidden_fraction < 1.0:
            raise InputError(f"--hidden-fraction must be in (0, 1), got {hidden_fraction}")
        self.length = length
        self.hidden_fraction = hidden_fraction
        self.seed = seed
        self.data = data
        self.source = None
        self.evaluator = make_evaluator(evaluator, model, evaluator_batch_size)

    def settings(self) -> dict:
        return {"data": self.source or str(self.data), "text": self.text, "length": self.length,
                "hidden_fraction": self.hidden_fraction, "hidden_per_chunk": self.num_hidden(),
                "evaluator": self.evaluator.name if self.evaluator else None,
                "evaluator_label": self.evaluator.label if self.evaluator else None}

    def num_hidden(self) -> int:
        return max(1, min(self.length, round(self.hidden_fraction * self.length)))

    def lines(self):
        from ..data import detokenize_wikitext_line

        for line in self.raw_lines():
            if self.text == "raw":
                yield line
            elif line.strip() and (clean := detokenize_wikitext_line(line)):
                yield clean + "\n"

    def raw_lines(self):
        if self.data is not None and str(self.data).startswith("hf:"):
            yield from _hf_lines(str(self.data)[3:])
            return
        path = Path(self.data) if self.data is not None else find_shared_data("wikitext-2", "test.txt.gz")
        if path is None:
            self.source = "hf:" + "/".join(HF_DATASET)
            yield from _hf_lines("/".join(HF_DATASET))
            return
        if not path.is_file():
            raise InputError(f"{path}: no such WikiText file")
        self.source = str(path)
        with open_text(path) as f:
            yield from f

    def examples(self, limit: int | None) -> list[Example]:
        from ..tokenization import encode

        L = self.length
        need = None if limit is None else limit * L
        tokens: list[int] = []
        for line in self.lines():
            tokens += encode(self.tokenizer, line)
            if need is not None and len(tokens) >= need:
                break
        n_chunks = len(tokens) // L
        if limit is not None:
            n_chunks = min(n_chunks, limit)
        out = []
        m = self.num_hidden()
        for i in range(n_chunks):
            ids = tokens[i * L : (i + 1) * L]
            hidden = torch.zeros(L, dtype=torch.bool)
            hidden[torch.randperm(L, generator=example_generator(self.seed, i))[:m]] = True
            out.append(Example(i, f"chunk-{i}", ids, hidden.tolist()))
        return out

    def score(self, examples, outputs, generated) -> list[dict]:
        from ..tokenization import decode

        texts = [decode(self.tokenizer, ids) for ids in outputs]
        recs = [{"entropy_generated_bits": unigram_entropy_bits(g), "entropy_sequence_bits": unigram_entropy_bits(o),
                 "text": t} for g, o, t in zip(generated, outputs, texts)]
        if self.evaluator is not None:
            ppls, extra = self.evaluator.perplexities(outputs, texts)
            for r, p, x in zip(recs, ppls, extra):
                r["gen_ppl"] = p
                r.update(x)
        return recs


def _tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError("this model has no tokenizer files; evaluations need text in and out")
    return tok


def _hf_lines(spec: str):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise InputError("no local WikiText-2 file found and the `datasets` package is not installed: "
                         "pass --data PATH (test.txt or test.txt.gz) or pip install datasets") from None
    from datasets import load_dataset

    name, _, config = spec.partition("/")
    try:
        ds = load_dataset(name, config or None, split="test")
    except Exception as exc:  # offline, unknown name...
        raise InputError(f"could not load the data set {spec!r} ({type(exc).__name__}: {exc}); pass --data PATH") from None
    for row in ds:
        yield row["text"]


# --- evaluators of generative perplexity -----------------------------------------------------------
def make_evaluator(spec: str | None, model, batch_size: int = 8):
    if spec in (None, "none"):
        return None
    if spec == "self":
        return SelfEvaluator(model)
    if spec == "auto":
        try:
            return HFEvaluator(PAPER_EVALUATOR, model.device, batch_size)
        except InputError as exc:
            print(f"asarm eval: {exc}; falling back to --evaluator self: {SELF_LABEL}", file=sys.stderr)
            return SelfEvaluator(model)
    return HFEvaluator(spec, model.device, batch_size)


class SelfEvaluator:
    name = "self"
    label = SELF_LABEL

    def __init__(self, model):
        self.model = model

    def perplexities(self, outputs, texts):
        from ..scoring import score

        L = max(len(o) for o in outputs)
        ids = torch.full((len(outputs), L), self.model.config.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros(len(outputs), L, dtype=torch.bool)
        for b, o in enumerate(outputs):
            ids[b, : len(o)] = torch.tensor(o)
            att[b, : len(o)] = True
        res = score(self.model, ids.to(self.model.device), att.to(self.model.device),
                    attention_mask=att.to(self.model.device), seed=0)
        nll = (-res.log_prob / res.num_tokens.clamp(min=1)).tolist()
        return [math.exp(x) for x in nll], [{"self_nll": x} for x in nll]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (skips transformers' long retry loop offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class HFEvaluator:
    """Perplexity of decoded text under a `transformers` causal LM (the paper: gpt2-large)."""

    def __init__(self, name: str, device, batch_size: int = 8):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise InputError("the transformers package is needed for --evaluator") from None
        local = Path(name).is_dir()
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            lm = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
        except Exception as exc:
            if local:
                raise InputError(f"could not load the evaluator {name!r} ({type(exc).__name__}: {exc})") from None
            if not hub_reachable():
                raise InputError(f"could not load the evaluator {name!r}: not in the local cache and the "
                                 "Hugging Face hub is unreachable") from None
            try:
                tok = AutoTokenizer.from_pretrained(name)
                lm = AutoModelForCausalLM.from_pretrained(name)
            except Exception as exc2:
                raise InputError(f"could not load the evaluator {name!r} ({type(exc2).__name__})") from None
        self.name = name
        self.label = f"gen-PPL under {name}"
        self.tokenizer = tok
        self.lm = lm.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        cfg = lm.config
        self.window = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def perplexities(self, outputs, texts):
        seqs = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            if self.bos is not None:
                ids = [self.bos] + ids
            seqs.append(ids[: self.window])
        ppls, extra = [], []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s : s + self.batch_size]
            L = max(len(x) for x in chunk)
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            att = torch.zeros(len(chunk), L, dtype=torch.long)
            for b, x in enumerate(chunk):
                ids[b, : len(x)] = torch.tensor(x)
                att[b, : len(x)] = 1
            logits = self.lm(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            tgt = ids[:, 1:].to(self.device)
            nll = -logp.gather(-1, tgt[..., None]).squeeze(-1)
            w = att[:, 1:].to(self.device).float()
            per = ((nll * w).sum(1) / w.sum(1).clamp(min=1)).tolist()
            for b, x in enumerate(chunk):
                toks = x[1:] if self.bos is not None else x
                ppls.append(math.exp(per[b]))
                extra.append({"eval_nll": per[b], "eval_tokens": len(toks),
                              "entropy_eval_tokens_bits": unigram_entropy_bits(toks)})
        return ppls, extra


# --- CLI ----------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--data", default=None, help="WikiText-2 test file (.txt or .txt.gz; default: the project's "
                   "offline copy), or hf:NAME/CONFIG for a `datasets` hub name")
    p.add_argument("--length", type=int, default=None, help="chunk length in tokens (default 512 or the model's limit)")
    p.add_argument("--hidden-fraction", type=float, default=0.95, help="fraction of each chunk hidden (default 0.95)")
    p.add_argument("--evaluator", default="auto", help="causal LM for generative perplexity: a transformers name or "
                   "path (paper: gpt2-large), 'self' (the model's own left-to-right likelihood), 'none', or 'auto' "
                   "(gpt2-large if loadable, else self)")
    p.add_argument("--evaluator-batch-size", type=int, default=8)
    p.add_argument("--text", default="clean", choices=["clean", "raw"], help="clean (default): detokenized, "
                   "sentences with <unk> dropped; raw: the tokenized release as it is")


def build_task(model, args) -> WikiTextTask:
    return WikiTextTask(model, data=args.data, length=args.length, hidden_fraction=args.hidden_fraction,
                        seed=args.seed, evaluator=args.evaluator, evaluator_batch_size=args.evaluator_batch_size,
                        text=args.text)
