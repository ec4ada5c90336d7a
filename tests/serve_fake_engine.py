"""TEMPORARY (until asarm.sampling.Engine lands on main): an adapter with the EngineAdapter's
interface that runs asarm.sample per row. Not shipped; delete after merging the engine."""

import dataclasses

import asarm
from asarm.sampling import check_options


@dataclasses.dataclass
class RoundEvent:
    positions: list
    tokens: list
    round: int
    nfe: int
    resampled: int | None


class Handle:
    def __init__(self, spec):
        self.spec, self.done, self._result = spec, False, None

    def result(self):
        return self._result


class FakeAdapter:
    def __init__(self, model):
        self.model, self.rows = model, []

    @staticmethod
    def make_config(options):
        check_options(options["method"], options["draft"], options["k"], options["temperature"],
                      options["top_k"], options["top_p"])
        return dict(options)

    def add(self, input_ids, masked, config, *, seed, order, on_round, return_logprobs):
        h = Handle((input_ids, masked, config, seed, order, on_round, return_logprobs))
        self.rows.append(h)
        return h

    def step(self):
        finished, self.rows = self.rows, []
        for h in finished:
            ids, masked, cfg, seed, order, on_round, lp = h.spec
            count = [0]

            def cb(row, positions, tokens):
                count[0] += 1
                if on_round:
                    on_round(RoundEvent(list(positions), list(tokens), count[0], count[0], None))

            h._result = asarm.sample(self.model, ids, masked, seed=seed, order=order, callback=cb,
                                     return_logprobs=lp, **cfg)
            h.done = True
        return finished

    def cancel(self, row):
        self.rows.remove(row)

    @property
    def active(self):
        return len(self.rows)

    @staticmethod
    def result(row):
        return row.result()
