"""``RowRunner``: where an evaluation's token rows run, on this process's engine or on Ray actors
(``asarm.batch.rows`` and ``asarm.batch.ray_runner``; this module sits above both)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .rows import RowResult, RowTask, iter_decoded


@dataclasses.dataclass
class RowRunner:
    """Where rows run: on this process's engine (``max_batch`` rows), or with ``ray`` on
    ``workers`` Ray actors, each loading ``model_ref`` (a shipped name or a path every node reads;
    None: the driver's model object, shipped to the actors) with ``load_options``."""

    max_batch: int = 32
    admit_wave: int | None = None
    ray: bool = False
    workers: int = 1
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int | None = 1
    model_ref: str | None = None
    load_options: dict | None = None
    stats: dict = dataclasses.field(default_factory=dict)  # the last run's pass counts or actor summary

    def run(self, model, tasks: list[RowTask]) -> Iterator[RowResult]:
        """Each task's ``RowResult``, as rows finish."""
        self.stats = {}
        if not self.ray:
            yield from iter_decoded(model, tasks, max_batch=self.max_batch, admit_wave=self.admit_wave,
                                    stats=self.stats)
            return
        from .ray_runner import decode_rows_on_ray

        yield from decode_rows_on_ray(tasks, model=self.model_ref or model, load_options=self.load_options,
                                      workers=self.workers, max_batch=self.max_batch, admit_wave=self.admit_wave,
                                      num_cpus=self.num_cpus, num_gpus=self.num_gpus, threads=self.threads,
                                      address=self.address, stats=self.stats)

    def describe(self) -> dict:
        """The runtime settings a run's meta records."""
        out = {"path": "ray" if self.ray else "engine", "max_batch": self.max_batch, "admit_wave": self.admit_wave}
        if self.ray:
            out.update(workers=self.workers, cpus_per_worker=self.num_cpus, gpus_per_worker=self.num_gpus,
                       threads_per_worker=self.threads)
        return out
