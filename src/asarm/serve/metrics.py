"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("asarm_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("asarm_request_latency_seconds", "time from arrival to the last byte "
                                 "of the answer", ["endpoint"], buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram("asarm_queue_wait_seconds", "time a request waited before its rows "
                                    "joined the batch", buckets=_LATENCY, registry=r)
        self.queue_depth = Gauge("asarm_queue_depth", "requests waiting to join the batch", registry=r)
        self.active_rows = Gauge("asarm_active_rows", "rows in the running batch", registry=r)
        self.rejected = Counter("asarm_rejected", "requests refused because the queue was full (429)", registry=r)
        self.passes = Counter("asarm_passes", "shared network passes of the engine loop", registry=r)
        self.pass_seconds = Histogram("asarm_pass_seconds", "wall time of one shared engine pass",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                      registry=r)
        self.batch_size = Histogram("asarm_batch_size", "rows per shared pass", buckets=_BATCH, registry=r)
        self.tokens_per_pass = Histogram("asarm_tokens_per_pass", "tokens filled in one shared pass, all rows",
                                         buckets=_BATCH, registry=r)
        self.tokens = Counter("asarm_generated_tokens", "tokens filled", registry=r)
        self.rounds = Counter("asarm_rounds", "decoding rounds, all rows", registry=r)
        self.resampled = Counter("asarm_resampled_tokens", "tokens drawn from the residual after a rejected "
                                 "draft (ASSD); acceptance rate = 1 - resampled / generated tokens", registry=r)
        self.acceptance = Gauge("asarm_acceptance_rate", "share of filled tokens that were not resampled "
                                "after a rejection, since start", registry=r)
        self.rows_finished = Counter("asarm_rows_finished", "rows that filled every hole", registry=r)
        self.rows_cancelled = Counter("asarm_rows_cancelled", "rows dropped before the end (client gone, "
                                      "timeout)", registry=r)

    def round_done(self, tokens: int, resampled: bool) -> None:
        self.rounds.inc()
        self.tokens.inc(tokens)
        if resampled:
            self.resampled.inc()
        total = self.tokens._value.get()
        if total:
            self.acceptance.set(1.0 - self.resampled._value.get() / total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
