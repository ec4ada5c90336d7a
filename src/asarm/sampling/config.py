"""The decoding schema: ``DecodeConfig`` and the proposer registry, declared once.

Everything else is derived from here: ``sample()`` and the engine take a ``DecodeConfig``; the
command line's flags (``asarm.cli_args.add_sampling_arguments``), the server's request fields
(``asarm.serve.schemas``) and evaluation's choices are built from its fields, their metadata
(help, bounds) and the registry's names. So a new option is one field here, and a new draft
type is one ``Proposer`` class plus one ``PROPOSERS`` line.

This module imports no torch (``asarm --help`` reads it): the registry names each proposer's
class by its import path, loaded when a row first needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable

from ..errors import InputError

METHODS = ("sequential", "assd")
VERIFICATIONS = ("token", "block")  # sampling/verification.py; kept here too, this module imports no torch
# The faster exact ASSD variants: options that only change how many passes a row takes, never its
# distribution. Evaluations offer them next to the sampler choices and apply them to ASSD only.
ASSD_VARIANTS = ("bonus", "one_pass", "adaptive_k", "verification", "branches")


@dataclasses.dataclass(frozen=True)
class ProposerInfo:
    """One registry entry: where a draft type's drafts come from, and how it is described."""

    cls: str | type  # "module:Class" relative to asarm.sampling (loaded on first use), or the class
    label: str  # how tables name it: "ASSD self-draft, k=5"
    help: str = ""
    needs_pass: bool = True  # a draft pass before each verify pass (False: drafts cost no network pass)
    lookahead: str | None = None  # the registry name of its one-pass form (``one_pass=True``), if any
    listed: bool = True  # offered as a ``draft`` choice (one-pass is reached through ``one_pass``)
    branching: bool = False  # can draft several continuations of an exact first draft (``branches``)

    def load(self) -> type:
        if not isinstance(self.cls, str):
            return self.cls
        module, name = self.cls.split(":")
        return getattr(importlib.import_module(module, __package__), name)


PROPOSERS: dict[str, ProposerInfo] = {
    "self": ProposerInfo(".proposers:SelfDraft", "self-draft", "a draft pass of the model itself",
                         lookahead="one-pass", branching=True),
    "ngram": ProposerInfo(".proposers:NgramDraft", "n-gram draft", "bigram counts of the row's own text (no pass)",
                          needs_pass=False),
    "one-pass": ProposerInfo(".proposers:OnePassDraft", "self-draft", "self drafts carried out of the oracle pass",
                             listed=False, branching=True),
    "head": ProposerInfo(".proposers:HeadDraft", "draft head", "a learned draft head over the draft pass's query "
                         "states, each draft conditioned on the ones before it (asarm train-draft)",
                         lookahead="head-one-pass", branching=True),
    "head-one-pass": ProposerInfo(".proposers:OnePassHeadDraft", "draft head", "head drafts from the oracle pass's "
                                  "lookahead queries", listed=False, branching=True),
}


def draft_names() -> tuple[str, ...]:
    """The ``draft`` choices: the listed registry names."""
    return tuple(name for name, info in PROPOSERS.items() if info.listed)


def option(default, help: str, **meta) -> dataclasses.Field:
    """A DecodeConfig field with what the CLI and the server need to offer it: ``help``;
    ``choices`` (a function: the registry may grow after import); bounds ``ge``/``gt``/``le``
    (the server's limits; the config itself checks what sampling needs); ``flag`` (the CLI
    spelling when not ``--field-name``); ``server=False`` / ``user=False`` to keep it off the
    server / off both."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature!r} (for argmax decoding use greedy=True)")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode: the sampler (``method``, ``draft``, ``k`` and the faster exact ASSD
    variants) and the target distribution (``temperature``, ``greedy``, ``top_k``, ``top_p``,
    ``suppress``; applied identically to drafts and oracle, so ASSD stays exact for it)."""

    method: str = option("assd", "sequential: one pass per token; assd: speculative rounds (default assd)",
                         choices=lambda: METHODS)
    draft: str = option("self", "ASSD draft (default self)", choices=draft_names)
    k: int = option(5, "ASSD draft block size (default 5)", ge=1, le=64, flag="-k")
    temperature: float = option(1.0, "sampling temperature > 0 (default 1; 0 means greedy)", ge=0.0, le=100.0)
    greedy: bool = option(False, "argmax decoding (exact for ASSD too)")
    top_k: int | None = option(None, "keep the k most likely tokens", ge=1, le=1_000_000)
    top_p: float | None = option(None, "nucleus sampling mass", gt=0.0, le=1.0)
    bonus: bool = option(False, "ASSD: a bonus token when every draft of a round is accepted")
    one_pass: bool = option(False, "ASSD self-draft: the oracle pass also drafts the next block, one pass per "
                                   "round (implies the bonus)")
    adaptive_k: bool = option(False, "ASSD: grow k after accepted rounds, shrink it after rejections")
    verification: str = option("token", "ASSD: verify drafts token by token, or as a block (Sun et al. 2025: "
                                        "never fewer drafts kept per round; with one-pass rounds it measures "
                                        "worse; default token)",
                               choices=lambda: VERIFICATIONS)
    branches: int = option(1, "ASSD: draft this many continuations per round and verify them in one pass, each "
                              "with its own attention mask (multi-draft: recursive rejection among them; self or "
                              "head drafts, two-pass or one-pass rounds; default 1: one chain)",
                           ge=1, le=8)
    cache: bool = option(True, "full recompute every pass (reference baseline)", flag="--no-cache", server=False)
    suppress: tuple[int, ...] = option((), "token ids never drawn (e.g. <unk>), besides the mask token", user=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.draft not in PROPOSERS:
            raise InputError(f"unknown draft {self.draft!r}: use one of {', '.join(draft_names())}")
        if not _is_int(self.k) or self.k < 1:
            raise InputError(f"k must be an integer >= 1, got {self.k!r}")
        check_temperature(self.temperature)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise InputError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.one_pass and (self.method != "assd" or PROPOSERS[self.draft].lookahead is None):
            raise InputError(f"one-pass rounds (one_pass) apply to method='assd' with a draft that has a one-pass "
                             f"form: {', '.join(n for n in draft_names() if PROPOSERS[n].lookahead)} "
                             "(n-gram rounds already take one pass)")
        if self.verification not in VERIFICATIONS:
            raise InputError(f"unknown verification {self.verification!r}: use one of {', '.join(VERIFICATIONS)}")
        if not _is_int(self.branches) or self.branches < 1:
            raise InputError(f"branches must be an integer >= 1, got {self.branches!r}")
        if self.branches > 1 and (self.method != "assd" or not PROPOSERS[self.proposer].branching
                                  or self.verification != "token"):
            raise InputError("branches > 1 (multi-draft verification) applies to method='assd' with a draft that "
                             f"can branch ({', '.join(n for n in draft_names() if PROPOSERS[n].branching)}) "
                             "and token-by-token verification")
        if not all(_is_int(t) and t >= 0 for t in self.suppress):
            raise InputError(f"suppress must be token ids, got {self.suppress!r}")
        object.__setattr__(self, "suppress", tuple(sorted(set(self.suppress))))
        for flag in ("greedy", "bonus", "one_pass", "adaptive_k", "cache"):
            object.__setattr__(self, flag, bool(getattr(self, flag)))
        object.__setattr__(self, "temperature", float(self.temperature))

    @classmethod
    def from_user(cls, flag: Callable[[str], str] = str, **options) -> DecodeConfig:
        """A config from what a person typed (CLI flags, a request body): temperature 0 means
        greedy decoding, the usual convention, and greedy decoding has no temperature (the
        length posterior of a ``[MASK]`` hole is then scored at 1). ``flag`` spells an option's
        name in messages (the CLI's "--temperature")."""
        temperature = options.get("temperature", 1.0)
        if temperature == 0 or options.get("greedy"):
            options.update(temperature=1.0, greedy=True)
        elif isinstance(temperature, (int, float)) and not temperature > 0 or temperature == math.inf:
            raise InputError(f"{flag('temperature')} must be > 0, got {temperature} "
                             f"(0 or {flag('greedy')}: argmax decoding)")
        return cls(**options)

    def replace(self, **changes) -> DecodeConfig:
        return dataclasses.replace(self, **changes)

    @property
    def proposer(self) -> str:
        """The registry name of the proposer a row drafts with."""
        return PROPOSERS[self.draft].lookahead if self.one_pass else self.draft

    @property
    def max_k(self) -> int:
        """The largest block a row may draft (adaptive k grows up to it)."""
        return max(3 * self.k, 8) if self.adaptive_k else self.k

    @property
    def variants(self) -> list[str]:
        flags = (("bonus", self.bonus), ("one-pass", self.one_pass), ("adaptive-k", self.adaptive_k),
                 ("block-verify", self.verification == "block"), (f"{self.branches}-branches", self.branches > 1))
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

    def target(self, mask_token_id: int):
        from .target import TargetDistribution

        return TargetDistribution(mask_token_id, self.temperature, self.greedy, self.top_k, self.top_p,
                                  self.suppress)


def user_fields(where: str = "cli") -> list[dataclasses.Field]:
    """The DecodeConfig fields a person sets, on the command line (``where="cli"``) or in a
    request body (``"server"``)."""
    return [f for f in dataclasses.fields(DecodeConfig)
            if f.metadata.get("user", True) and (where != "server" or f.metadata.get("server", True))]


def field_type(f: dataclasses.Field) -> type:
    """A field's value type (``int | None`` -> int), from its annotation."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"int": int, "float": float, "str": str, "bool": bool}[kind.split("|")[0].strip()]


def config_label(method: str, draft: str | None, k: int | None, variants=()) -> str:
    """Human label of a configuration (also for result records read back from JSON)."""
    if method == "sequential":
        return "sequential"
    label = f"ASSD {PROPOSERS[draft].label if draft in PROPOSERS else draft}, k={k}"
    return label + "".join(f" + {v}" for v in variants)


def speedup_configs(k: int) -> list[DecodeConfig]:
    """Sequential, plain ASSD, each faster exact variant and their combination; then the
    same with block verification; multi-draft one-pass rounds; then the learned draft head
    (``head_configs``)."""
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
        DecodeConfig("assd", "self", k, verification="block"),
        DecodeConfig("assd", "self", k, one_pass=True, verification="block"),
        DecodeConfig("assd", "ngram", k, bonus=True, verification="block"),
        DecodeConfig("assd", "self", k, one_pass=True, branches=3),
    ] + head_configs(k)


def head_configs(k: int) -> list[DecodeConfig]:
    """The learned draft head (a model needs one: ``asarm train-draft``): two-pass and one-pass
    rounds, fixed and adaptive k, one chain and multi-draft trees of 3 branches."""
    return [
        DecodeConfig("assd", "head", k),
        DecodeConfig("assd", "head", k, one_pass=True),
        DecodeConfig("assd", "head", k, adaptive_k=True),
        DecodeConfig("assd", "head", k, one_pass=True, adaptive_k=True),
        DecodeConfig("assd", "head", k, branches=3),
        DecodeConfig("assd", "head", k, one_pass=True, branches=3),
    ]
