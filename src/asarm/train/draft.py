"""``asarm train-draft``: train a draft head (``asarm.draft_head``) for a frozen model.

Data: the model's own training recipe (its training config's sources, chunk length, hidden
fractions), tokenized with the model's tokenizer, split by document as the model's run split it.
Each batch hides a fraction of every chunk as training does, in the left-to-right order the
samplers use, and cuts the hidden positions into blocks (random size 3..8, random offset). One
pass of the frozen model, with no cache, gives both what the head reads and what it learns:

- the *draft states* of a block: every position of the block queried at the block's first rank,
  so it sees the visible tokens and the hidden ones before the block (a draft pass), or at the
  rank before that for half the blocks, missing the token just before the block (the lookahead
  queries of a one-pass round, which do not see the bonus token);
- the *teacher*: the chain's own conditional at each position, p(x_ti | context, x_t1..x_t(i-1))
  (the query at its own rank), which is what the oracle pass checks a draft against.

The head, fed the true tokens as its previous drafts (teacher forcing), is trained to minimise
KL(teacher || head) at every block position except a draft pass's first (that draft is the
exact conditional already). The acceptance probability of a draft is 1 - TV(teacher, head), and
the KL bounds the TV (Pinsker), so this is the quantity speculative decoding rewards.

The run is bounded by ``--minutes`` and/or ``--steps``; a resumable state is written atomically
every ``save_every`` steps, the head itself at the end (``draft_head.save_head``). A finished run
cannot be resumed, so ``--init-from DIR`` trains on from the head saved in DIR instead (a warm
start: the weights only, with a fresh optimizer and learning-rate schedule).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..draft_head import HEAD_CONFIG, HEAD_WEIGHTS, DraftHead, DraftHeadConfig, has_head, head_readout, load_head, save_head
from ..errors import CheckpointError, InputError
from ..ranks import key_ranks, training_ranks
from ..storage import SHIPPED_DIR, shipped_models

STATE = "draft_head.train.pt"  # resumable state, beside the head while training
DEFAULT_D_HIDDEN = 384


@dataclasses.dataclass
class DraftTrainOptions:
    minutes: float = 30.0
    steps: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 50
    d_hidden: int | None = None  # None: DEFAULT_D_HIDDEN, or the --init-from head's
    min_block: int = 3
    max_block: int = 8
    seed: int = 0
    save_every: int = 50
    eval_every: int = 100
    max_chars: int | None = 10_000_000  # of training text read (the head needs far less than the model)


def recipe_chunks(model, config_path: str, max_chars: int | None, log=print) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train chunks, validation chunks, recipe facts) from a model's training config."""
    from ..data import load_documents, pack, split_documents, tokenize_documents
    from .config import load_config

    cfg = load_config(config_path)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("the model has no tokenizer files: train-draft tokenizes its data recipe with them")
    t0 = time.time()
    docs = load_documents(cfg.data, kind=cfg.tokenizer_kind, max_chars=max_chars)
    if cfg.valid_data:
        train_docs, valid_docs = docs, load_documents(cfg.valid_data, kind=cfg.tokenizer_kind)
    else:
        train_docs, valid_docs = split_documents(docs, cfg.valid_fraction, cfg.seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    seq_len = min(cfg.seq_len, model.config.max_length or cfg.seq_len)
    train = pack(tokenize_documents(tokenizer, train_docs), seq_len, eos)
    valid = pack(tokenize_documents(tokenizer, valid_docs), seq_len, eos)
    log(f"data: {len(train)} training / {len(valid)} validation chunks of {seq_len} tokens from {config_path} "
        f"({time.time() - t0:.0f}s)")
    facts = {"config": str(config_path), "seq_len": seq_len, "mask_low": cfg.mask_low, "mask_high": cfg.mask_high}
    return train, valid, facts


def block_batch(chunks: torch.Tensor, low: float, high: float, mask_id: int, block: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One training batch's rank structure (module docstring): per chunk the hidden positions in
    order [B, M], and per hidden position its draft-state rank, teacher rank, step index in its
    block, previous token and distance to it, and whether it is trained."""
    B, L = chunks.shape
    fraction = low + (high - low) * torch.rand(B, generator=generator, dtype=torch.float64)
    ranks = training_ranks(B, L, fraction, generator)
    n_hidden = (ranks > 0).sum(1)
    M = int(n_hidden.max())
    # hidden positions in decoding order: sort by rank, visible (rank 0) last
    order = torch.where(ranks > 0, ranks, L + 1).argsort(1)[:, :M]
    j = torch.arange(M).expand(B, M)
    valid = j < n_hidden[:, None]
    offset = torch.randint(0, block, (B, 1), generator=generator)
    start = torch.where(j < offset, 0, offset + (j - offset).div(block, rounding_mode="floor") * block)
    gap_mode = (torch.rand(B, M, generator=generator) < 0.5).gather(1, start) & (start > 0)  # one-pass form
    step = j - start
    prev_pos = torch.cat([order[:, :1], order[:, :-1]], 1)
    prev = torch.where(j > 0, chunks.gather(1, prev_pos), mask_id)
    gap = torch.where(j > 0, order - prev_pos, 0)
    draft_rank = torch.where(valid, start + 1 - gap_mode.long(), 0)
    teacher_rank = torch.where(valid, j + 1, 0)
    trained = valid & ~((step == 0) & ~gap_mode)
    return dict(ranks=ranks, order=torch.where(valid, order, 0), draft_rank=draft_rank, teacher_rank=teacher_rank,
                step=step, prev=prev, gap=gap, trained=trained)


@torch.no_grad()
def model_pass(model, chunks: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft states [B, M, d] float32, teacher log-probs [B, M, V] float32) from one pass."""
    B, L = chunks.shape
    M = batch["order"].shape[1]
    positions = torch.arange(L).expand(B, L)
    query_pos = torch.cat([batch["order"], batch["order"]], 1)
    query_rank = torch.cat([batch["draft_rank"], batch["teacher_rank"]], 1)
    dev = model.device
    logits, hidden = model.forward_rows(chunks.to(dev), positions.to(dev), key_ranks(batch["ranks"]).to(dev),
                                        query_pos.to(dev), query_rank.to(dev), return_hidden=True)
    teacher = logits[:, M:].float()
    teacher[..., model.config.mask_token_id] = -math.inf  # the mask token is never a target (sampling/target.py)
    return hidden[:, :M].float(), torch.log_softmax(teacher, -1)


def head_logprobs(head: DraftHead, readout, hidden: torch.Tensor, batch: dict, mask_id: int) -> torch.Tensor:
    """The head's log-probs [B, M, V], teacher-forced over every block at once."""
    embedding, bias = readout
    prev_emb = embedding[batch["prev"]]
    out = head.forward_blocks(hidden, prev_emb, batch["step"], batch["gap"])
    logits = out @ embedding.T + bias
    logits[..., mask_id] = -math.inf
    return torch.log_softmax(logits, -1)


def block_metrics(logp_head: torch.Tensor, logp_teacher: torch.Tensor, hidden: torch.Tensor, readout,
                  trained: torch.Tensor, mask_id: int) -> dict[str, float]:
    """KL and acceptance (sum min(p, q)) of the head and of the plain self-draft (the model's own
    draft states read directly) on the trained positions."""
    embedding, bias = readout
    q = logp_teacher[trained].exp()
    base = hidden[trained] @ embedding.T + bias
    base[..., mask_id] = -math.inf
    p_self = torch.softmax(base, -1)
    p_head = logp_head[trained].exp()
    kl = (q * (logp_teacher[trained] - logp_head[trained])).nan_to_num(0.0).sum(-1).mean()
    return {"kl": float(kl), "accept_head": float(torch.minimum(p_head, q).sum(-1).mean()),
            "accept_self": float(torch.minimum(p_self, q).sum(-1).mean())}


def _save_state(out: Path, head, optimizer, step: int, elapsed: float, generator, init_from: dict | None) -> None:
    tmp = out / (STATE + ".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                "generator": generator.get_state(), "config": dataclasses.asdict(head.config),
                "init_from": json.dumps(init_from)}, tmp)
    tmp.replace(out / STATE)


def initial_head(model, init_from, d_hidden: int | None) -> tuple[DraftHead, dict]:
    """The head saved in ``init_from`` (a directory, or a shipped model's name: its own head;
    checked against ``model`` by ``load_head``) to train on,
    and what the new head's json records about it: its directory and, where its json says, the
    steps and minutes it was already trained."""
    directory = Path(init_from)
    if not directory.is_dir() and str(init_from) in shipped_models():  # a shipped model's own head
        directory = SHIPPED_DIR / str(init_from)
    if not has_head(directory):
        raise InputError(f"--init-from {directory}: no draft head there (no {HEAD_WEIGHTS}); give a directory "
                         "that `asarm train-draft` saved a head into")
    head = load_head(directory, model.config)
    if d_hidden is not None and d_hidden != head.config.d_hidden:
        raise InputError(f"--init-from {directory}: its head has d_hidden {head.config.d_hidden}, not the "
                         f"--d-hidden {d_hidden} asked for (leave --d-hidden out to keep the head's)")
    source = {"head": str(directory)}
    trained = json.loads((directory / HEAD_CONFIG).read_text()).get("trained")
    if isinstance(trained, dict):
        source.update({k: trained[k] for k in ("steps", "minutes", "init_from") if k in trained})
    return head.train(), source


def train_draft_head(model, config_path: str, out, options: DraftTrainOptions, resume: bool = False,
                     init_from=None, log=print) -> Path:
    """Train a head for ``model`` (frozen) on its recipe; save it into ``out``. Returns its path.
    ``init_from``: a directory holding a head for this model to start from (module docstring)."""
    out = Path(out)
    if init_from is not None and resume:
        raise InputError("--init-from starts a new run from a saved head; --resume continues an unfinished run "
                         "(its state holds the weights): give one of them")
    if (out / STATE).exists() and not resume:
        raise InputError(f"{out} holds an unfinished draft-head run ({STATE}): pass --resume to continue it, or "
                         "remove the file")
    if resume and not (out / STATE).exists():
        raise InputError(f"--resume: no unfinished draft-head run in {out} ({STATE})")
    mask_id = model.config.mask_token_id
    source, state = None, None
    if resume:
        try:
            state = torch.load(out / STATE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{out / STATE}: cannot resume ({type(exc).__name__}: {exc})") from None
    if init_from is not None:  # before the data: a bad directory answers at once
        head, source = initial_head(model, init_from, options.d_hidden)
        log(f"starting from the head in {init_from} ({source})")
    else:
        d_hidden = options.d_hidden or (state or {}).get("config", {}).get("d_hidden") or DEFAULT_D_HIDDEN
        head = DraftHead(DraftHeadConfig(model.config.d_model, model.config.vocab_size, d_hidden))
    train, valid, facts = recipe_chunks(model, config_path, options.max_chars, log)
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if resume:
        try:
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            step, elapsed = int(state["step"]), float(state["elapsed"])
            generator.set_state(state["generator"])
            source = json.loads(state.get("init_from", "null"))
        except Exception as exc:
            raise CheckpointError(f"{out / STATE}: cannot resume ({type(exc).__name__}: {exc})") from None
        log(f"resuming at step {step} ({elapsed / 60:.1f} min done)")
    model.eval()
    readout = head_readout(model)
    valid_gen = torch.Generator().manual_seed(1234)
    valid_chunks = valid[: 4 * options.batch_size]
    valid_batches = [(c, block_batch(c, facts["mask_low"], facts["mask_high"], mask_id, 5, valid_gen))
                     for c in valid_chunks.split(options.batch_size)]
    valid_passes = [(c, b, *model_pass(model, c, b)) for c, b in valid_batches]

    def evaluate() -> dict[str, float]:
        head.eval()
        with torch.no_grad():
            rows = [block_metrics(head_logprobs(head, readout, h, b, mask_id), t, h, readout, b["trained"], mask_id)
                    for _, b, h, t in valid_passes]
        head.train()
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    out.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter() - elapsed
    budget = options.minutes * 60
    head.train()
    log(f"step {step}: validation {evaluate()}")
    while True:
        elapsed = time.perf_counter() - start_time
        frac = max(elapsed / budget if budget > 0 else 0.0, step / options.steps if options.steps else 0.0)
        if frac >= 1.0:
            break
        lr = options.lr * min(1.0, (step + 1) / options.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train), (options.batch_size,), generator=generator)
        chunks = train[idx]
        block = int(torch.randint(options.min_block, options.max_block + 1, (), generator=generator))
        batch = block_batch(chunks, facts["mask_low"], facts["mask_high"], mask_id, block, generator)
        hidden, teacher = model_pass(model, chunks, batch)
        logp = head_logprobs(head, readout, hidden, batch, mask_id)
        trained = batch["trained"]
        kl = (teacher.exp() * (teacher - logp)).nan_to_num(0.0).sum(-1)
        loss = kl[trained].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            log(f"step {step}: kl {loss.item():.4f} lr {lr:.2e} ({elapsed / 60:.1f} min)")
        if step % options.eval_every == 0:
            log(f"step {step}: validation {evaluate()}")
        if step % options.save_every == 0:
            _save_state(out, head, optimizer, step, time.perf_counter() - start_time, generator, source)
    final = evaluate()
    minutes = (time.perf_counter() - start_time) / 60
    log(f"done: {step} steps in {minutes:.1f} min; validation {final}")
    head.eval()
    meta = {"trained": {"steps": step, "minutes": round(minutes, 1), "batch_size": options.batch_size,
                        "threads": torch.get_num_threads(), "objective": "KL(model chain conditional || head)",
                        "validation": {k: round(v, 4) for k, v in final.items()}, **facts,
                        "lr": options.lr, "warmup_steps": options.warmup_steps, "seed": options.seed,
                        **({"init_from": source} if source else {})}}
    path = save_head(head, out, meta=meta)
    (out / STATE).unlink(missing_ok=True)
    log(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB) and {out / 'draft_head.json'}")
    return path


def default_config(model) -> str:
    """The training config of a shipped model, by its directory name (``asarm-en-small``)."""
    from .config import CONFIG_DIR

    name = Path(getattr(model, "name_or_path", "") or "").name
    for candidate in (f"{name}-gpu", name):  # the GPU recipe trained the current shipped models
        if (CONFIG_DIR / f"{candidate}.json").is_file():
            return candidate
    raise InputError(f"no training config named after the model {name!r}: give the model's data recipe with "
                     "--config (a training config file)")


def add_cli(sub) -> None:
    """``asarm train-draft MODEL``: the parser (asarm.cli's lazy commands)."""
    from ..cli_args import add_threads_argument

    d = DraftTrainOptions()
    p = sub.add_parser("train-draft", help="train a draft head (draft=head) for a frozen model on its own data",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="shipped model name or checkpoint directory")
    p.add_argument("--out", default=None, help="where the head goes (default: the model's directory, where "
                   "load_model picks it up)")
    p.add_argument("--config", default=None, help="the model's training config (its data recipe); default: the "
                   "shipped config named after the model")
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"wall-clock budget (default {d.minutes:g})")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the time budget)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"chunks per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear warmup to the peak "
                   f"learning rate, then a cosine decay to a tenth of it at the end (default {d.warmup_steps})")
    p.add_argument("--d-hidden", type=int, default=None, help=f"the head's width (default {DEFAULT_D_HIDDEN}, or "
                   "the --init-from head's)")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters of the recipe's text to read "
                   f"(default {d.max_chars:,})")
    p.add_argument("--dtype", default="auto", choices=["fp32", "bf16", "auto"], help="the frozen model's dtype "
                   "during training (auto: bf16 on a CPU with native bf16; the head trains in fp32)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    p.add_argument("--init-from", default=None, metavar="DIR", help="start from the draft head saved in DIR "
                   "(e.g. the model's directory, or a shipped model's name: its head) instead of an untrained one, "
                   "to train a finished head longer; "
                   "a fresh optimizer and schedule (a lower --lr suits a warm start)")
    add_threads_argument(p)
    p.set_defaults(func=run_train_draft)


def run_train_draft(args) -> int:
    from ..checkpoint import load_model

    for name in ("minutes", "batch_size", "lr", "max_chars"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("steps", "warmup_steps", "d_hidden"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    model = load_model(args.model, device="cpu", dtype=args.dtype)
    config = args.config or default_config(model)
    out = args.out or model.name_or_path
    options = DraftTrainOptions(minutes=args.minutes, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                max_chars=args.max_chars, seed=args.seed, warmup_steps=args.warmup_steps,
                                d_hidden=args.d_hidden)
    path = train_draft_head(model, config, out, options, resume=args.resume, init_from=args.init_from,
                            log=lambda *a: print(*a, flush=True))
    print(json.dumps({"head": str(path), **json.loads((path.parent / "draft_head.json").read_text())}))
    return 0
