"""The server's only contact with the sampling engine (``asarm.sampling.Engine``).

Everything else in ``asarm.serve`` talks to this small adapter, so a change of the engine's API
touches this file alone. Like the engine, the adapter is NOT thread-safe: only the engine loop's
thread calls ``add``, ``step`` and ``cancel``. ``make_config`` is pure and may run anywhere (the
request handlers call it to reject bad sampler options with a 400 before anything is queued).
"""

from __future__ import annotations

from typing import Callable

import torch


class EngineAdapter:
    def __init__(self, model):
        from ..sampling import Engine

        self.model = model
        self.engine = Engine(model, cache=True)

    @staticmethod
    def make_config(options: dict):
        """A validated per-row decode config from sampler options (InputError when bad)."""
        from .. import DecodeConfig

        return DecodeConfig(cache=True, **options)

    # Engine.add/step/cancel build tensors from the weights: without no_grad every pass would keep
    # an autograd graph chained through the cache, and a long-running server grows without bound
    # (measured: ~40 MB per finished row, killed by the OOM killer after a few minutes under load).
    @torch.no_grad()
    def add(self, input_ids, masked, config, *, seed: int, order: str,
            on_round: Callable | None, return_logprobs: bool):
        """Start a row; returns its handle. Bad input raises InputError at once."""
        return self.engine.add(input_ids, masked, config, seed=seed, order=order,
                               on_round=on_round, return_logprobs=return_logprobs)

    @torch.no_grad()
    def step(self) -> list:
        """One shared network pass over every active row; the handles that finished in it."""
        return self.engine.step()

    @torch.no_grad()
    def cancel(self, row) -> None:
        self.engine.cancel(row)

    @property
    def active(self) -> int:
        return self.engine.active

    @staticmethod
    def result(row):
        """The finished row's SampleResult (input_ids [L], nfe, rounds, accepted, ...)."""
        return row.result()
