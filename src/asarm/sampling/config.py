"""``DecodeConfig``: every decoding option in one frozen, validated object.

``sample()``, the engine, the CLI, ``asarm bench`` and ``asarm eval`` all take this one
definition; ``speedup_configs`` is the one list of the faster exact ASSD variants.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import InputError
from .target import TargetDistribution

METHODS = ("sequential", "assd")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature!r} (for argmax decoding use greedy=True)")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode. ``method`` "sequential" (one pass per token) or "assd"; ``draft`` names a
    registered proposer ("self", "ngram"); ``k`` the draft block size; ``temperature``/``greedy``/
    ``top_k``/``top_p``/``suppress`` define the target distribution (applied identically to
    drafts and oracle, so ASSD stays exact for it); ``bonus``/``one_pass``/``adaptive_k`` are the
    faster exact ASSD variants; ``cache=False`` recomputes every pass (the reference baseline)."""

    method: str = "assd"
    draft: str = "self"
    k: int = 5
    temperature: float = 1.0
    greedy: bool = False
    top_k: int | None = None
    top_p: float | None = None
    bonus: bool = False
    one_pass: bool = False
    adaptive_k: bool = False
    cache: bool = True
    suppress: tuple[int, ...] = ()  # token ids never drawn (e.g. <unk>), besides the mask token

    def __post_init__(self):
        from .proposers import PROPOSERS

        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.draft not in PROPOSERS:
            raise InputError(f"unknown draft {self.draft!r}: use one of {', '.join(PROPOSERS)}")
        if not _is_int(self.k) or self.k < 1:
            raise InputError(f"k must be an integer >= 1, got {self.k!r}")
        check_temperature(self.temperature)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise InputError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.one_pass and (self.method != "assd" or not PROPOSERS[self.draft].supports_lookahead):
            raise InputError("one_pass applies to method='assd' with draft='self' "
                             "(n-gram rounds already take one pass)")
        if not all(_is_int(t) and t >= 0 for t in self.suppress):
            raise InputError(f"suppress must be token ids, got {self.suppress!r}")
        object.__setattr__(self, "suppress", tuple(sorted(set(self.suppress))))
        for flag in ("greedy", "bonus", "one_pass", "adaptive_k", "cache"):
            object.__setattr__(self, flag, bool(getattr(self, flag)))
        object.__setattr__(self, "temperature", float(self.temperature))

    def replace(self, **changes) -> DecodeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def max_k(self) -> int:
        """The largest block a row may draft (adaptive k grows up to it)."""
        return max(3 * self.k, 8) if self.adaptive_k else self.k

    @property
    def variants(self) -> list[str]:
        flags = (("bonus", self.bonus), ("one-pass", self.one_pass), ("adaptive-k", self.adaptive_k))
        return [name for name, on in flags if on and self.method == "assd"]

    @property
    def name(self) -> str:
        """Short, stable identifier (result files are keyed by it): "sequential",
        "assd-self-k5+one-pass"; target options appear only when not the defaults."""
        base = "sequential" if self.method == "sequential" else "+".join([f"assd-{self.draft}-k{self.k}"] + self.variants)
        extra = [("greedy", self.greedy), (f"T{self.temperature:g}", self.temperature != 1.0 and not self.greedy),
                 (f"topk{self.top_k}", self.top_k is not None), (f"topp{self.top_p:g}" if self.top_p else "", self.top_p is not None),
                 ("nocache", not self.cache)]
        return "+".join([base] + [text for text, on in extra if on])

    @property
    def label(self) -> str:
        return config_label(self.method, self.draft, self.k, self.variants)

    def target(self, mask_token_id: int) -> TargetDistribution:
        return TargetDistribution(mask_token_id, self.temperature, self.greedy, self.top_k, self.top_p,
                                  self.suppress)


def config_label(method: str, draft: str | None, k: int | None, variants=()) -> str:
    """Human label of a configuration (also for result records read back from JSON)."""
    if method == "sequential":
        return "sequential"
    label = f"ASSD {'self-draft' if draft == 'self' else 'n-gram draft'}, k={k}"
    return label + "".join(f" + {v}" for v in variants)


def speedup_configs(k: int) -> list[DecodeConfig]:
    """Sequential, plain ASSD, each faster exact variant and their combination."""
    return [
        DecodeConfig("sequential", k=1),
        DecodeConfig("assd", "self", k),
        DecodeConfig("assd", "self", k, bonus=True),
        DecodeConfig("assd", "self", k, one_pass=True),
        DecodeConfig("assd", "self", k, adaptive_k=True),
        DecodeConfig("assd", "self", k, one_pass=True, adaptive_k=True),
        DecodeConfig("assd", "ngram", k),
        DecodeConfig("assd", "ngram", k, bonus=True),
        DecodeConfig("assd", "ngram", k, bonus=True, adaptive_k=True),
    ]
