"""The server's only contact with the sampling engine (``asarm.sampling.Engine``).

Everything else in ``asarm.serve`` talks to this small adapter, so a change of the engine's API
touches this file alone. Like the engine, the adapter is NOT thread-safe: only the engine loop's
thread calls ``add``, ``step`` and ``cancel``. (The engine runs them under ``torch.no_grad``:
an autograd graph chained through the cache once grew a long-running server by ~40 MB per
finished row.)
"""

from __future__ import annotations

from typing import Callable


class EngineAdapter:
    def __init__(self, model):
        from ..sampling import Engine

        self.model = model
        self.engine = Engine(model, cache=True)

    def add(self, input_ids, masked, config, *, seed: int, order: str,
            on_round: Callable | None, return_logprobs: bool, constraints=None):
        """Start a row; returns its handle. Bad input raises InputError at once."""
        return self.engine.add(input_ids, masked, config, seed=seed, order=order,
                               on_round=on_round, return_logprobs=return_logprobs, constraints=constraints)

    def step(self) -> list:
        """One shared network pass over every active row; the handles that finished in it."""
        return self.engine.step()

    def cancel(self, row) -> None:
        self.engine.cancel(row)

    @property
    def active(self) -> int:
        return self.engine.active

    @staticmethod
    def result(row):
        """The finished row's SampleResult (input_ids [L], nfe, rounds, accepted, ...), and
        ``order``: its hidden positions in decoding order (exact top log-probs need it)."""
        result = row.result()
        result.order = list(row.row.order)
        return result
