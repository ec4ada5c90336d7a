"""The machinery every evaluation shares: examples, decoding configurations, batching, seeds,
sharding, resumable JSONL records, statistics.

How a run is laid out (identical results however it is split):
- A task turns its data set into a list of ``Example`` (token ids + which positions are hidden).
- The first ``--limit`` examples are cut into *global* batches of ``--batch-size`` consecutive
  examples. A shard ``i/n`` takes the batches whose number is ``i`` mod ``n``; each batch runs
  every decoding configuration with a seed derived from ``--seed`` and the batch's first index.
  So a batch's output does not depend on which shard ran it, and ``merge`` of the shards equals an
  unsharded run (timings aside).
- Each finished (configuration, batch) appends one JSON record per example to the shard's
  ``records*.jsonl`` and flushes it. A rerun with the same output folder skips (configuration,
  batch) pairs whose records are all there, and reruns a partly written batch in full (keeping
  the records it already had), so a crashed run resumes with the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import InputError
from ..sampling.config import ASSD_VARIANTS, DecodeConfig, config_label, draft_names, speedup_configs  # noqa: F401  (re-exported)
from ..seeds import batch_seed, example_seed  # noqa: F401  (batch_seed re-exported)

RECORD_GLOB = "records*.jsonl"


@dataclasses.dataclass
class Example:
    index: int  # position in the task's example list (0-based)
    id: str
    ids: list[int]  # full sequence, true tokens at the hidden positions
    hidden: list[bool]
    info: dict = dataclasses.field(default_factory=dict)  # task data (reference text, problem...)

    @property
    def num_hidden(self) -> int:
        return sum(self.hidden)


def decode_configs(method: str, draft: str, k: int, sweep: list[int] | None, **variants) -> list[DecodeConfig]:
    """The configurations a run decodes with. ``method`` "all": sequential + ASSD self + ASSD
    n-gram (the paper's WikiText table). ``sweep``: sequential + ASSD (``draft``) at each k.
    ``variants`` (``ASSD_VARIANTS``: bonus, one_pass, adaptive_k, verification, branches) apply to
    every ASSD configuration (``DecodeConfig`` refuses one it cannot take, such as one_pass for a
    draft without a one-pass form)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"-k must be an integer >= 1, got {k!r}")
    unknown = set(variants) - set(ASSD_VARIANTS)
    if unknown:
        raise InputError(f"not ASSD variants: {', '.join(sorted(unknown))} (use {', '.join(ASSD_VARIANTS)})")
    drafts = draft_names() if draft == "both" else (draft,)
    if sweep:
        plan = [("sequential", "self", 1)] + [("assd", d, kk) for d in drafts for kk in sweep]
    elif method == "all":
        plan = [("sequential", "self", 1), ("assd", "self", k), ("assd", "ngram", k)]
    elif method == "sequential":
        plan = [("sequential", "self", 1)]
    elif method == "assd":
        plan = [("assd", d, k) for d in drafts]
    else:
        raise InputError(f"unknown method {method!r}: use all, sequential or assd")
    return [DecodeConfig(m, d, kk, **(variants if m == "assd" else {})) for m, d, kk in plan]


def parse_sweep(text) -> list[int] | None:
    if text is None:
        return None
    try:
        ks = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--sweep-k takes comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise InputError(f"--sweep-k values must be integers >= 1, got {text!r}")
    return ks


# --- sharding ---------------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n). Without it, torchrun's RANK / WORLD_SIZE when set, else 0/1."""
    if text is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is not None and world is not None:
            text = f"{rank}/{world}"
        else:
            return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text}: need 0 <= i < n")
    return i, n


def records_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return out_dir / ("records.jsonl" if n == 1 else f"records.shard-{i}-of-{n}.jsonl")


def make_batches(examples: list[Example], batch_size: int) -> list[list[Example]]:
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def shard_batches(batches: list[list[Example]], shard: tuple[int, int]) -> list[list[Example]]:
    i, n = shard
    return [b for j, b in enumerate(batches) if j % n == i]


def example_generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    """A generator for per-example protocol randomness (e.g. which positions are hidden)."""
    return torch.Generator().manual_seed(example_seed(seed, index, salt))


# --- records --------------------------------------------------------------------------------
def read_records(paths: Iterable[Path]) -> list[dict]:
    """Records from JSONL files; a torn last line (a crash mid-write) is ignored."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def dedupe(records: list[dict]) -> list[dict]:
    """One record per (config, index), the last one written winning; sorted by config, index."""
    by_key = {}
    for r in records:
        by_key[(r["config"], int(r["index"]))] = r
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[0], k[1]))]


class RecordWriter:
    """Appends records to a JSONL file, flushing (and fsync-ing) after each batch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a torn last line from a crash would glue onto the next record: start on a fresh line
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "a", encoding="utf-8") as g:
                        g.write("\n")
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        for r in records:
            self.file.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        self.file.flush()
        try:
            os.fsync(self.file.fileno())
        except OSError:
            pass

    def close(self) -> None:
        self.file.close()


# --- meta (the settings of a run, checked on resume) --------------------------------------------
def write_or_check_meta(out_dir: Path, meta: dict, overwrite: bool = False) -> None:
    path = out_dir / "meta.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None:
            keys = [k for k in meta if k not in ("configs", "runtime")]
            diff = [k for k in keys if old.get(k) != meta.get(k)]
            if diff:
                k = diff[0]
                raise InputError(
                    f"{out_dir} holds a run with different settings ({k}: {old.get(k)!r} there, {meta.get(k)!r} now); "
                    "use another --output folder or --overwrite")
            configs = list(dict.fromkeys(list(old.get("configs", [])) + list(meta.get("configs", []))))
            meta = {**meta, "configs": configs}
    if overwrite:
        for p in list(out_dir.glob(RECORD_GLOB)) + [out_dir / "summary.json", out_dir / "summary.md"]:
            if p.is_file():
                p.unlink()
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(out_dir: Path) -> dict:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise InputError(f"{out_dir}: no meta.json (not an asarm eval output folder)")
    return json.loads(path.read_text())


# --- statistics ---------------------------------------------------------------------------------
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t critical value: the table entry at the largest tabulated degrees
    of freedom <= df (conservative), 1.96 from 1000 on."""
    if df >= 1000:
        return 1.96
    return _T975[max(k for k in _T975 if k <= max(df, 1))]


def mean_ci(values: list[float]) -> dict:
    """Mean with the half-width of its 95% t confidence interval (None for fewer than 2 values)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * math.sqrt(var / n), "n": n}


def proportion_ci(successes: int, n: int) -> dict:
    """A proportion with its 95% Wilson score interval (as [low, high]) and a +- half-width."""
    if n == 0:
        return {"mean": None, "ci95": None, "low": None, "high": None, "n": 0}
    z = 1.959964
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"mean": p, "ci95": half, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "n": n}


def unigram_entropy_bits(tokens: list[int]) -> float:
    """Entropy (bits) of the empirical unigram distribution of ``tokens`` (0 for none)."""
    if not tokens:
        return 0.0
    counts = defaultdict(int)
    for t in tokens:
        counts[t] += 1
    n = len(tokens)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


# --- data files -----------------------------------------------------------------------------------
def find_shared_data(*parts: str) -> Path | None:
    """Locate the project's offline data (``shared/data``): $ASARM_DATA, then ``shared/data`` or
    ``../shared/data`` from the working directory and from this package's checkout upwards."""
    candidates = []
    env = os.environ.get("ASARM_DATA")
    if env:
        candidates.append(Path(env))
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for d in [start, *start.parents]:
            candidates += [d / "shared" / "data", d.parent / "shared" / "data"]
    for c in candidates:
        p = c.joinpath(*parts)
        if p.exists():
            return p
    return None


def open_text(path: Path):
    """Open a text file, transparently gunzipping ``*.gz``."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


# --- batching tensors -------------------------------------------------------------------------------
def pad_batch(examples: list[Example], pad_id: int, mask_id: int):
    """(input_ids, masked, attention_mask) tensors for a batch, right-padded with ``pad_id``;
    hidden positions hold ``mask_id`` (their true tokens never reach the sampler)."""
    L = max(1, max(len(e.ids) for e in examples))
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    masked = torch.zeros(B, L, dtype=torch.bool)
    att = torch.zeros(B, L, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        row = torch.tensor(e.ids, dtype=torch.long)
        hid = torch.tensor(e.hidden, dtype=torch.bool)
        row[hid] = mask_id
        ids[b, :n] = row
        masked[b, :n] = hid
        att[b, :n] = True
    return ids, masked, att


def fit_infill(prefix: list[int], middle: list[int], suffix: list[int], max_len: int | None):
    """Trim the context so that prefix + middle + suffix fits ``max_len`` tokens: the middle is
    kept whole, the prefix loses tokens at its start and the suffix at its end (each keeps at
    least half of the room when both are long). Returns (prefix, suffix, fits)."""
    if max_len is None or len(prefix) + len(middle) + len(suffix) <= max_len:
        return prefix, suffix, True
    room = max_len - len(middle)
    if room < 0:
        return prefix, suffix, False
    s = min(len(suffix), max(room // 2, room - len(prefix)))
    p = room - s
    return (prefix[len(prefix) - p :] if p > 0 else []), suffix[:s], True
