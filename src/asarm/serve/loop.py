"""The engine loop: one thread owns the model and the engine; requests reach it through a queue.

Between two shared passes the loop drops the rows of requests that were cancelled (client gone,
timeout), admits waiting requests while their rows fit under ``max_batch`` (first come, first
served), runs each admitted request's ``prepare`` (which may use the model: length posteriors,
scoring), and starts its rows. Then one ``step``: one network pass over every active row. Each
request hears back through its ``Channel``: "start", "round", "done" per row, then "end"; or one
"error". Exactly one of "end" / "error" per request, so none is lost or answered twice.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from functools import partial
from typing import Callable

from ..errors import ASARMError

log = logging.getLogger("asarm.serve")


class QueueFull(Exception):
    """The wait queue holds ``max_queue`` requests already (answered with 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (503)."""


@dataclasses.dataclass
class RowSpec:
    input_ids: object  # LongTensor [L]
    masked: object     # BoolTensor [L]
    config: object     # the adapter's per-row decode config
    seed: int
    order: str = "left-to-right"
    return_logprobs: bool = False
    constraints: object = None  # the row's HoleConstraints (asarm.sampling.constraints), if any


class Channel:
    """Carries a job's events from the engine thread to the request's asyncio task."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, payload=None) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    async def get(self, timeout: float | None):
        return await asyncio.wait_for(self._queue.get(), timeout)


class Job:
    """A request's work. ``prepare()`` runs on the engine thread and returns (rows, info)."""

    def __init__(self, n_rows: int, prepare: Callable, channel: Channel, rounds: bool = True):
        self.n_rows, self.prepare, self.channel = n_rows, prepare, channel
        self.rounds = rounds  # send "round" events (streams); else only "done", which wakes the event loop less
        self.cancelled = False
        self.remaining = 0
        self.arrived = time.monotonic()
        self.admitted: float | None = None


class EngineLoop:
    def __init__(self, adapter, *, max_batch: int, max_queue: int, metrics, pass_delay: float = 0.0,
                 admit_wave: int = 1):
        self.adapter, self.max_batch, self.max_queue, self.metrics = adapter, max_batch, max_queue, metrics
        # Rows join a running batch once this many slots are free (or all waiting rows fit). 1: at
        # once (the server: latency). Larger (asarm batch: throughput): newcomers share their first
        # pass, which lays out all their visible tokens, instead of each one padding a pass.
        self.admit_wave = max(1, min(admit_wave, max_batch))
        self.pass_delay = pass_delay  # tests slow the loop down to catch it mid-request
        self._pending: collections.deque[Job] = collections.deque()
        self._rows: dict[int, tuple[object, Job, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._stop = False
        self._starting: Job | None = None  # the job whose prepare() runs now (in neither list)
        self._pass_tokens = 0
        self._thread = threading.Thread(target=self._run, name="asarm-engine", daemon=True)

    # --- called from request handlers (any thread) -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail what still waits, and end the thread (after in-flight requests,
        which the HTTP server has already drained)."""
        with self._lock:
            self._closed = True
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        for job in list(self._pending) + [j for _, j, _ in self._rows.values()]:
            job.channel.emit("error", ShuttingDown("the server stopped before this request ran"))

    def abort(self, exc: Exception) -> None:
        """Answer every request in flight with ``exc`` now and take no new work: the end of the
        shutdown grace period. Any thread may call it; the engine drops the rows at its next pass."""
        with self._lock:
            self._closed = True
            jobs = list(self._pending)
        jobs += [j for _, j, _ in list(self._rows.values())]
        if self._starting is not None:
            jobs.append(self._starting)
        for job in {id(j): j for j in jobs}.values():
            job.cancelled = True
            job.channel.emit("error", exc)  # the request hears the first of "error" / "end" only
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def retry_after(self) -> int:
        """Seconds a refused client should wait: a rough time for the queue to move."""
        return max(1, min(60, len(self._pending) // max(self.max_batch, 1) + 1))

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            self._drop_cancelled()
            self._admit()
            if self.adapter.active:
                self._step()
            elif not self._pending:
                self._wake.wait(1.0)

    def _drop_cancelled(self) -> None:
        for key, (handle, job, _) in list(self._rows.items()):
            if job.cancelled:
                self.adapter.cancel(handle)
                del self._rows[key]
                self.metrics.rows_cancelled.inc()
        with self._lock:
            if any(j.cancelled for j in self._pending):
                self._pending = collections.deque(j for j in self._pending if not j.cancelled)
        self.metrics.active_rows.set(self.adapter.active)

    def _admit(self) -> None:
        admitted = 0
        while True:
            with self._lock:
                if not self._pending:
                    break
                job = self._pending[0]
                if self.adapter.active and self.adapter.active + job.n_rows > self.max_batch:
                    break
                if self.adapter.active and not admitted and self.admit_wave > 1:
                    waiting = sum(j.n_rows for j in self._pending)
                    if self.max_batch - self.adapter.active < min(self.admit_wave, waiting):
                        break  # wait for a wave of free slots
                self._pending.popleft()
                self.metrics.queue_depth.set(len(self._pending))
            job.admitted = time.monotonic()
            self.metrics.queue_wait.observe(job.admitted - job.arrived)
            self._start(job)
            admitted += 1
        self.metrics.active_rows.set(self.adapter.active)

    def _start(self, job: Job) -> None:
        added = []
        self._starting = job
        try:
            rows, info = job.prepare()
            job.channel.emit("start", info)
            for choice, spec in enumerate(rows):
                handle = self.adapter.add(spec.input_ids, spec.masked, spec.config, seed=spec.seed,
                                          order=spec.order, return_logprobs=spec.return_logprobs,
                                          constraints=spec.constraints,
                                          on_round=partial(self._on_round, job, choice))
                added.append((handle, choice))
        except Exception as exc:  # noqa: BLE001 - answered as an error, never kills the loop
            for handle, _ in added:
                self.adapter.cancel(handle)
            if not isinstance(exc, ASARMError):
                log.exception("preparing a request failed")
            job.channel.emit("error", exc)
            return
        finally:
            self._starting = None
        job.remaining = len(added)
        for handle, choice in added:
            self._rows[id(handle)] = (handle, job, choice)
        if not added:
            job.channel.emit("end")

    def _on_round(self, job: Job, choice: int, event) -> None:
        self._pass_tokens += len(event.tokens)
        self.metrics.round_done(len(event.tokens), event.resampled is not None)
        if job.rounds:
            job.channel.emit("round", (choice, event))

    def _step(self) -> None:
        batch = self.adapter.active
        self._pass_tokens = 0
        start = time.perf_counter()
        try:
            finished = self.adapter.step()
        except Exception as exc:  # noqa: BLE001 - a bug: fail the batch, keep serving
            log.exception("an engine pass failed")
            self._fail_all(exc)
            return
        self.metrics.passes.inc()
        self.metrics.pass_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(batch)
        self.metrics.tokens_per_pass.observe(self._pass_tokens)
        for handle in finished:
            _, job, choice = self._rows.pop(id(handle))
            job.remaining -= 1
            self.metrics.rows_finished.inc()
            job.channel.emit("done", (choice, self.adapter.result(handle)))
            if job.remaining == 0:
                job.channel.emit("end")
        self.metrics.active_rows.set(self.adapter.active)
        if self.pass_delay:
            time.sleep(self.pass_delay)

    def _fail_all(self, exc: Exception) -> None:
        jobs = {id(job): job for _, job, _ in self._rows.values()}
        for handle, _, _ in self._rows.values():
            try:
                self.adapter.cancel(handle)
            except Exception:  # noqa: BLE001
                log.exception("cancelling a row after a failed pass")
        self._rows.clear()
        for job in jobs.values():
            job.channel.emit("error", exc)
