"""Every seed in asarm: where a fresh one is drawn, and how streams are derived from a user's.

Same seed, same output: a run's randomness comes from one user seed (or one fresh seed, drawn
here and reported back), and each independent stream gets its own value derived from it. The
derivations differ in constants only because results recorded before they were gathered here
must stay reproducible.
"""

from __future__ import annotations

import random

from .errors import InputError


def fresh_seed() -> int:
    """A new random seed, for callers that give none (sampling, infill, the server)."""
    return random.SystemRandom().randrange(2**62)


def resolve_seed(seed) -> int:
    """``seed`` checked, or a fresh one when it is None."""
    if seed is None:
        return fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    return seed


def row_seed(seed: int, row: int) -> int:
    """Row ``row`` of a call seeded with ``seed`` draws from its own stream, independent of the
    batch it runs in: a torch.Generator seeded with this value."""
    return (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def length_seed(seed: int) -> int:
    """The stream that draws the lengths of a text's unknown-length holes (apart from the rows'
    streams, so choosing lengths does not shift the tokens' draws)."""
    return (int(seed) * 2_862_933_555_777_941_757 + 3_037_000_493) % (2**63)


def choice_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the ``n`` choices of one request: choice i is the request seeded ``seed + i``."""
    return [seed + i for i in range(n)]


def batch_seed(seed: int, first_index: int) -> int:
    """Seed of the evaluation batch that starts at example ``first_index``: independent of sharding."""
    return (int(seed) * 1_000_003 + first_index * 7919 + 12345) % (2**62)


def example_seed(seed: int, index: int, salt: int = 0) -> int:
    """Per-example protocol randomness of an evaluation (e.g. which positions are hidden)."""
    return (int(seed) * 2_654_435_761 + index * 40_503 + salt) % (2**62)
