"""What a run needs before its first step: the tokenizer and packed chunks (built once into
``out_dir/prepared`` and reused on resume) and the model (fresh or fine-tuned)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..config import ASARMConfig
from ..errors import CheckpointError, InputError
from ..model import ASARM
from .checkpoints import fsync_dir, fsync_tree, writing
from .config import TrainConfig
from .objective import seed_for

CHUNKS = "chunks.pt"


def _read_prepared(prep: Path):
    from ..tokenization import load_tokenizer

    try:  # weights_only: a planted pickle cannot run code; only tensors and containers load
        data = torch.load(prep / CHUNKS, map_location="cpu", weights_only=True)
        train, valid = data["train"], data["valid"]
    except Exception as exc:
        raise CheckpointError(f"{prep / CHUNKS} is unreadable ({type(exc).__name__}); it holds the run's "
                              "packed data: restore it, or start a new run") from None
    if not (isinstance(train, torch.Tensor) and isinstance(valid, torch.Tensor)):
        raise CheckpointError(f"{prep / CHUNKS}: expected 'train' and 'valid' tensors")
    return load_tokenizer(prep), train, valid


def _tokenizer(cfg: TrainConfig, train_docs: list[str], log):
    from ..tokenization import load_tokenizer, train_tokenizer

    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer is None:
            raise InputError(f"tokenizer {cfg.tokenizer}: no tokenizer files there")
        return tokenizer
    if cfg.init_from is not None and load_tokenizer(cfg.init_from) is not None:
        return load_tokenizer(cfg.init_from)
    texts = train_docs
    if cfg.tokenizer_max_chars:
        texts, total = [], 0
        for d in train_docs:
            texts.append(d)
            total += len(d)
            if total >= cfg.tokenizer_max_chars:
                break
    tokenizer = train_tokenizer(texts, cfg.tokenizer_vocab_size, kind=cfg.tokenizer_kind)
    log(f"tokenizer: trained {cfg.tokenizer_kind} BPE, vocabulary {len(tokenizer)}")
    return tokenizer


def _pack(cfg: TrainConfig, tokenizer, train_docs, valid_docs):
    from ..data import pack, tokenize_documents

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    train = pack(tokenize_documents(tokenizer, train_docs), cfg.seq_len, eos)
    try:
        valid = pack(tokenize_documents(tokenizer, valid_docs), cfg.seq_len, eos)
    except InputError:
        raise InputError("validation data is too small for one chunk of seq_len tokens: raise "
                         "valid_fraction or give more validation data") from None
    return train, valid


def prepare_data(cfg: TrainConfig, out_dir: Path, log=print):
    """Tokenizer + packed chunks in ``out_dir/prepared`` (built once, reused on resume)."""
    from ..data import load_documents, split_documents

    prep = out_dir / "prepared"
    if (prep / CHUNKS).is_file():
        return _read_prepared(prep)
    t0 = time.time()
    docs = load_documents(cfg.data, kind=cfg.tokenizer_kind, max_chars=cfg.max_chars)
    if cfg.valid_data:
        train_docs, valid_docs = docs, load_documents(cfg.valid_data, kind=cfg.tokenizer_kind)
    else:
        train_docs, valid_docs = split_documents(docs, cfg.valid_fraction, cfg.seed)
    log(f"data: {len(train_docs)} training and {len(valid_docs)} validation documents, "
        f"{sum(map(len, train_docs)):,} / {sum(map(len, valid_docs)):,} characters")
    tokenizer = _tokenizer(cfg, train_docs, log)
    train, valid = _pack(cfg, tokenizer, train_docs, valid_docs)
    log(f"data: {train.numel():,} training tokens in {len(train)} chunks, {valid.numel():,} validation "
        f"tokens ({time.time() - t0:.0f}s)")
    tmp = out_dir / ".prepared.tmp"
    with writing(f"prepared data in {prep}", cleanup=tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokenizer.save_pretrained(str(tmp))
        torch.save({"train": train, "valid": valid}, tmp / CHUNKS)
        fsync_tree(tmp)
        shutil.rmtree(prep, ignore_errors=True)
        tmp.replace(prep)
        fsync_dir(out_dir)
    return tokenizer, train, valid


def _fine_tune_start(cfg: TrainConfig, tokenizer) -> ASARM:
    from ..checkpoint import load_model

    model = load_model(cfg.init_from, device="cpu", dtype="fp32")
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise InputError(f"tokenizer has {len(tokenizer)} tokens but {cfg.init_from} has a vocabulary "
                         f"of {model.config.vocab_size}")
    if "dropout" in cfg.model:
        model.config.dropout = float(cfg.model["dropout"])
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = model.config.dropout
    return model


def build_model(cfg: TrainConfig, tokenizer) -> ASARM:
    """``init_from``'s weights, or a fresh model from ``cfg.model`` sized to the tokenizer (its
    vocabulary and special ids), initialised from the run's seed."""
    if cfg.init_from is not None:
        return _fine_tune_start(cfg, tokenizer)
    fields = dict(cfg.model)
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "mask_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                fields.setdefault(name, int(value))
    fields.setdefault("max_length", None)
    try:
        config = ASARMConfig(**fields)
    except TypeError as exc:
        raise InputError(f"invalid model config: {exc}") from None
    torch.manual_seed(seed_for(cfg.seed, 7))
    return ASARM(config)
