"""Token rows through the batch path: what an evaluation hands ``asarm batch``'s engines.

A request line is text, run through the server's app (``local.py``). An evaluation already holds
each example as token ids, its hidden positions, a decoding configuration and a seed, and wants
every row decoded exactly as ``asarm.sampling.sample`` decodes it: the same ``Engine.add`` with
the same ``(seed, row_index)`` stream, so a row's tokens do not depend on which rows share its
passes (docs/design.md, "Randomness"; float rounding aside). This module runs such rows

- locally: ``decode_rows`` keeps one engine full (continuous batching up to ``max_batch`` rows,
  newcomers admitted in waves, rows ordered by hidden-token count so a wave finishes together);
- on Ray: ``asarm.batch.ray_runner.decode_rows_on_ray``, the same function in an actor per engine;

and ``asarm.batch.runner.RowRunner`` picks one of the two for a caller.

Rows travel as ``RowTask`` / ``RowResult`` (plain lists and numbers: JSON for Ray). The batch
module knows nothing about evaluations; ``asarm.evaluation`` imports this, never the reverse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from ..errors import InputError


@dataclasses.dataclass
class RowTask:
    """One row to decode: ``sample(model, input_ids, hidden, config, seed=seed)``'s row
    ``row_index``, identified by ``key``."""

    key: str
    input_ids: list[int]
    hidden: list[bool]
    config: object  # asarm.sampling.DecodeConfig
    seed: int
    row_index: int = 0

    @property
    def num_hidden(self) -> int:
        return sum(self.hidden)

    def to_json(self) -> dict:
        return {"key": self.key, "input_ids": list(self.input_ids), "hidden": [bool(h) for h in self.hidden],
                "config": dataclasses.asdict(self.config), "seed": self.seed, "row_index": self.row_index}

    @classmethod
    def from_json(cls, obj: dict) -> RowTask:
        from ..sampling.config import DecodeConfig

        return cls(obj["key"], obj["input_ids"], obj["hidden"], DecodeConfig(**obj["config"]), obj["seed"],
                   obj["row_index"])


@dataclasses.dataclass
class RowResult:
    """A decoded row: the filled ids and the counts ``SampleResult`` has for it. ``elapsed`` is
    the row's time in the engine, from ``add`` to its last pass (shared with its batch mates)."""

    key: str
    output_ids: list[int]
    nfe: int
    draft_calls: int
    rounds: int
    accepted: list[int]  # tokens per round
    elapsed: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> RowResult:
        return cls(**obj)


def by_hidden_count(tasks: Iterable[RowTask]) -> list[RowTask]:
    """Rows with the most hidden tokens first (stable). Rows with similar counts take similar
    numbers of rounds, so a wave that starts together also ends together instead of leaving a
    few long rows to run passes nearly alone; longest first keeps the last wave short."""
    return sorted(tasks, key=lambda t: -t.num_hidden)


def decode_rows(model, tasks: list[RowTask], **options) -> list[RowResult]:
    """Every row of ``tasks`` decoded (``iter_decoded``'s options), in the order of ``tasks``."""
    results = {r.key: r for r in iter_decoded(model, tasks, **options)}
    return [results[t.key] for t in tasks]


def iter_decoded(model, tasks: list[RowTask], *, max_batch: int = 32, admit_wave: int | None = None,
                 sort: bool = True, stats: dict | None = None) -> Iterator[RowResult]:
    """Decode ``tasks`` on one engine of at most ``max_batch`` rows, yielding each row as it
    finishes. Waiting rows join once ``admit_wave`` slots are free (default ``max_batch``: whole
    waves, as ``asarm batch``) or every waiting row fits; ``sort``: most hidden tokens first
    (``by_hidden_count``). ``stats``, if given, gets the pass counts at the end: passes,
    row-passes (rows summed over passes), the engine's forward and step seconds."""
    import torch

    from ..sampling import Engine

    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}")
    if len({t.key for t in tasks}) != len(tasks):
        raise InputError("row keys must be unique")
    if any(t.config.cache != tasks[0].config.cache for t in tasks):
        raise InputError("rows with and without the cache cannot share an engine")
    wave = max(1, min(admit_wave or max_batch, max_batch))
    engine = Engine(model, cache=tasks[0].config.cache if tasks else True)
    waiting = by_hidden_count(tasks) if sort else list(tasks)
    waiting.reverse()  # pop() from the end takes them in order
    active: dict[int, tuple[object, RowTask]] = {}
    passes = row_passes = 0

    def result(handle, task) -> RowResult:
        row = handle.row
        return RowResult(task.key, row.tokens.tolist(), int(row.nfe), int(row.draft_calls), int(row.rounds),
                         [int(a) for a in row.accepted], float((handle.finished or handle.started) - handle.started))

    while waiting or active:
        finished = []
        free = max_batch - len(active)
        if waiting and (not active or free >= min(wave, len(waiting))):
            while waiting and len(active) < max_batch:
                task = waiting.pop()
                with torch.no_grad():
                    handle = engine.add(torch.tensor(task.input_ids, dtype=torch.long),
                                        torch.tensor(task.hidden, dtype=torch.bool), task.config, seed=task.seed,
                                        row_index=task.row_index)
                if handle.done:  # nothing hidden: finished without a pass
                    finished.append((handle, task))
                else:
                    active[id(handle)] = (handle, task)
        if active:
            row_passes += len(active)
            passes += 1
            finished += [active.pop(id(h)) for h in engine.step()]
        for handle, task in finished:
            yield result(handle, task)
    if stats is not None:
        stats.update(passes=passes, row_passes=row_passes, forward_seconds=round(engine.forward_seconds, 3),
                     step_seconds=round(engine.step_seconds, 3))
