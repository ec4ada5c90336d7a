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
             revision: str | None = None, rows=None) -> dict:
    """Run ``task`` with every configuration on this shard's batches; returns the summary of
    the records this run's examples have in this shard's file (see ``common`` for the layout).

    ``rows``: an ``asarm.batch.runner.RowRunner`` to decode on the batch path (one engine with
    continuous batching, or Ray actors) instead of one ``sample`` call per batch. Each example
    is still its batch's row, with its batch's seed, so the records are those of the sequential
    harness (float rounding aside, docs/evaluation.md); only the timings mean something else."""
    from .report import write_reports

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if not configs:
        raise InputError("no decoding configuration to run")
    out_dir = Path(out_dir)
    examples = task.examples(limit)
    if not examples:
        raise InputError(f"{task.name}: no examples to evaluate")
    runtime = {"device": str(model.device), "threads": torch.get_num_threads()}
    if rows is not None:
        runtime["decoding"] = rows.describe()
    meta = {
        "task": task.name,
        "settings": task.settings(),
        "model": model_info(model, model_name, revision),
        "seed": seed,
        "batch_size": batch_size,
        "temperature": temperature,
        "configs": [c.name for c in configs],
        "runtime": runtime,  # not checked on resume
    }
    write_or_check_meta(out_dir, meta, overwrite=overwrite)
    rec_path = records_path(out_dir, shard)
    done = {(r["config"], int(r["index"])) for r in read_records([rec_path])}
    batches = shard_batches(make_batches(examples, batch_size), shard)
    work = [(b, c.replace(temperature=temperature), c.name) for b in batches for c in configs
            if not all((c.name, e.index) in done for e in b)]
    writer = RecordWriter(rec_path)
    bar = _progress(len(work), f"eval {task.name}", progress)

    def finished(batch, config, name, seed_b, decoded):
        """A (batch, configuration) is decoded: score it, append its records."""
        records = batch_records(task, batch, config, name, seed_b, decoded, done)
        writer.write(records)
        done.update((name, e.index) for e in batch)
        bar.update(1)

    try:
        if rows is None:
            for batch, config, name in work:
                seed_b = batch_seed(seed, batch[0].index)
                finished(batch, config, name, seed_b, sample_batch(model, batch, config, seed_b))
        else:
            decode_on_rows(model, work, seed, rows, finished)
    finally:
        bar.close()
        writer.close()
    wanted = {e.index for e in examples}
    records = [r for r in dedupe(read_records([rec_path])) if int(r["index"]) in wanted]
    suffix = "" if shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"
    return write_reports(out_dir, records, suffix=suffix)


def sample_batch(model, batch, config, seed_b) -> tuple[list, float]:
    """The sequential harness: one ``sample`` call for the batch. Returns (per example a
    ``RowResult``, the call's seconds)."""
    from ..batch.rows import RowResult
    from ..sampling import sample

    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.mask_token_id
    ids, masked, att = pad_batch(batch, pad_id, cfg.mask_token_id)
    result = sample(model, ids.to(model.device), masked.to(model.device), config, seed=seed_b,
                    attention_mask=att.to(model.device))
    filled = result.input_ids.cpu()
    share = result.elapsed / len(batch)
    return [RowResult(str(e.index), filled[b, : len(e.ids)].tolist(), int(result.nfe[b]),
                      int(result.draft_calls[b]), int(result.rounds[b]), [int(a) for a in result.accepted[b]], share)
            for b, e in enumerate(batch)], result.elapsed


def decode_on_rows(model, work, seed: int, rows, finished) -> None:
    """Every (batch, configuration) of ``work`` as rows of the batch path: example b of a batch
    is row b of its batch's seed, exactly as ``sample`` would run it. ``finished`` hears each
    (batch, configuration) once all its rows are back (in the order they complete)."""
    from ..batch.rows import RowTask

    mask_id = model.config.mask_token_id
    groups, tasks = {}, []
    for g, (batch, config, name) in enumerate(work):
        seed_b = batch_seed(seed, batch[0].index)
        groups[g] = {"batch": batch, "config": config, "name": name, "seed": seed_b, "rows": {}}
        for b, e in enumerate(batch):
            ids = [mask_id if h else t for t, h in zip(e.ids, e.hidden)]  # the true tokens stay here
            tasks.append(RowTask(f"{g}/{b}", ids, list(e.hidden), config, seed_b, b))
    for result in rows.run(model, tasks):
        g, b = (int(x) for x in result.key.split("/"))
        group = groups[g]
        group["rows"][b] = result
        if len(group["rows"]) == len(group["batch"]):
            decoded = [group["rows"][i] for i in range(len(group["batch"]))]
            finished(group["batch"], group["config"], group["name"], group["seed"],
                     (decoded, max(r.elapsed for r in decoded)))
            del groups[g]
    if groups:  # a runner that lost rows must not leave a silent hole in the records
        raise RuntimeError(f"the batch path returned no result for {len(groups)} (batch, configuration) pairs")


def batch_records(task, batch, config, name: str, seed_b: int, decoded, done) -> list[dict]:
    """The records of one decoded (batch, configuration): per example the task's metrics and the
    decoding counts (examples already recorded are skipped)."""
    rows, batch_elapsed = decoded
    outputs = [r.output_ids for r in rows]
    generated = [[t for t, h in zip(row, e.hidden) if h] for row, e in zip(outputs, batch)]
    metrics = task.score(batch, outputs, generated)
    records = []
    for e, r, m in zip(batch, rows, metrics):
        if (name, e.index) in done:
            continue
        tokens = int(sum(r.accepted))
        rec = {
            "task": task.name, "config": name, "method": config.method,
            "draft": config.draft if config.method == "assd" else None, "k": config.k,
            "variants": config.variants,
            "index": e.index, "id": e.id, "seed": seed_b, "batch_size": len(batch),
            "length": len(e.ids), "hidden_tokens": e.num_hidden, "generated_tokens": tokens,
            "nfe": r.nfe, "draft_calls": r.draft_calls, "rounds": r.rounds,
            "tokens_per_round": tokens / r.rounds if r.rounds else None,
            "passes_per_token": r.nfe / tokens if tokens else None,
            "elapsed_s": r.elapsed, "batch_elapsed_s": batch_elapsed,
        }
        rec.update(m)
        records.append(rec)
    return records


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
