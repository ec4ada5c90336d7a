"""The evaluation loop: batches x decoding configurations -> resumable JSONL records -> summary."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import InputError
from .common import (
    DecodeConfig,
    RecordWriter,
    batch_seed,
    dedupe,
    make_batches,
    pad_batch,
    read_records,
    records_path,
    shard_batches,
    write_or_check_meta,
)


def model_info(model, name: str | None = None, revision: str | None = None) -> dict:
    cfg = model.config
    info = {"model": name, "revision": revision, "vocab_size": cfg.vocab_size, "dtype": str(model.dtype).replace("torch.", "")}
    try:
        info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    except Exception:  # a stand-in model in tests
        pass
    return info


def run_task(task, model, *, configs: list[DecodeConfig], out_dir, batch_size: int = 1, seed: int = 0,
             shard: tuple[int, int] = (0, 1), limit: int | None = None, temperature: float = 1.0,
             overwrite: bool = False, progress: bool = True, model_name: str | None = None,
             revision: str | None = None) -> dict:
    """Run ``task`` with every configuration on this shard's batches; returns the summary of
    the records this run's examples have in this shard's file (see ``common`` for the layout)."""
    from ..sampling import sample
    from .report import write_reports

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if not configs:
        raise InputError("no decoding configuration to run")
    out_dir = Path(out_dir)
    examples = task.examples(limit)
    if not examples:
        raise InputError(f"{task.name}: no examples to evaluate")
    meta = {
        "task": task.name,
        "settings": task.settings(),
        "model": model_info(model, model_name, revision),
        "seed": seed,
        "batch_size": batch_size,
        "temperature": temperature,
        "configs": [c.name for c in configs],
        "runtime": {"device": str(model.device), "threads": torch.get_num_threads()},  # not checked on resume
    }
    write_or_check_meta(out_dir, meta, overwrite=overwrite)
    rec_path = records_path(out_dir, shard)
    done = {(r["config"], int(r["index"])) for r in read_records([rec_path])}
    batches = shard_batches(make_batches(examples, batch_size), shard)
    work = [(b, c) for b in batches for c in configs
            if not all((c.name, e.index) in done for e in b)]
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.mask_token_id
    writer = RecordWriter(rec_path)
    bar = _progress(len(work), f"eval {task.name}", progress)
    try:
        for batch, config in work:
            ids, masked, att = pad_batch(batch, pad_id, cfg.mask_token_id)
            seed_b = batch_seed(seed, batch[0].index)
            # records stay keyed by config.name; the temperature is in the run's meta
            result = sample(model, ids.to(model.device), masked.to(model.device),
                            config.replace(temperature=temperature), seed=seed_b,
                            attention_mask=att.to(model.device))
            filled = result.input_ids.cpu()
            outputs, generated = [], []
            for b, e in enumerate(batch):
                row = filled[b, : len(e.ids)].tolist()
                outputs.append(row)
                generated.append([t for t, h in zip(row, e.hidden) if h])
            metrics = task.score(batch, outputs, generated)
            records = []
            for b, (e, m) in enumerate(zip(batch, metrics)):
                if (config.name, e.index) in done:
                    continue
                tokens = int(sum(result.accepted[b]))
                nfe, rounds = int(result.nfe[b]), int(result.rounds[b])
                rec = {
                    "task": task.name, "config": config.name, "method": config.method,
                    "draft": config.draft if config.method == "assd" else None, "k": config.k,
                    "variants": config.variants,
                    "index": e.index, "id": e.id, "seed": seed_b, "batch_size": len(batch),
                    "length": len(e.ids), "hidden_tokens": e.num_hidden, "generated_tokens": tokens,
                    "nfe": nfe, "draft_calls": int(result.draft_calls[b]), "rounds": rounds,
                    "tokens_per_round": tokens / rounds if rounds else None,
                    "passes_per_token": nfe / tokens if tokens else None,
                    "elapsed_s": result.elapsed / len(batch), "batch_elapsed_s": result.elapsed,
                }
                rec.update(m)
                records.append(rec)
            writer.write(records)
            done.update((config.name, e.index) for e in batch)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    wanted = {e.index for e in examples}
    records = [r for r in dedupe(read_records([rec_path])) if int(r["index"]) in wanted]
    suffix = "" if shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"
    return write_reports(out_dir, records, suffix=suffix)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def fill_oracle(examples) -> tuple[list[list[int]], list[list[int]]]:
    """(outputs, generated) as if the sampler had produced the true tokens: the harness's own
    extraction and scoring, checked without a model."""
    outputs = [list(e.ids) for e in examples]
    generated = [[t for t, h in zip(e.ids, e.hidden) if h] for e in examples]
    return outputs, generated
