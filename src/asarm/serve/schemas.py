"""Request bodies. Strict types (no "yes" for a bool, no 1.5 for an int), unknown fields refused,
every number bounded, so bad input is a 400 with the field named, before anything is queued."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHARS = 100_000  # texts longer than this are refused before tokenizing
MAX_N = 16           # choices per request (also capped by --max-batch)


class Sampler(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**62)
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    # asarm fields
    method: Literal["assd", "sequential"] = "assd"
    draft: Literal["self", "ngram"] = "self"
    k: int = Field(5, ge=1, le=64)
    greedy: bool = False
    bonus: bool = False
    one_pass: bool = False
    adaptive_k: bool = False
    allow_special: bool = False  # let holes contain <unk>, <s>, padding, ... (excluded by default)
    order: Literal["left-to-right", "random"] = "left-to-right"
    max_hole: int = Field(32, ge=1, le=4096, description="longest length tried for [MASK] / a suffix")
    length_prior: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=4096,
        description="weights of hole lengths 1, 2, ... for [MASK] / a suffix (e.g. `asarm length-prior`); default uniform")

    def decode_options(self) -> dict:
        greedy = self.greedy or self.temperature == 0.0
        return dict(method=self.method, draft=self.draft, k=self.k,
                    temperature=1.0 if greedy else self.temperature, greedy=greedy,
                    top_k=self.top_k, top_p=self.top_p, bonus=self.bonus, one_pass=self.one_pass,
                    adaptive_k=self.adaptive_k)


class CompletionRequest(Sampler):
    prompt: str = Field(..., max_length=MAX_CHARS)
    suffix: str | None = Field(None, max_length=MAX_CHARS)
    max_tokens: int = Field(16, ge=1, le=100_000)
    hole_length: int | None = Field(None, ge=1, le=100_000,
                                    description="asarm: the middle's length when a suffix is given")
    logprobs: int | None = Field(None, ge=0, le=1, description="0 or 1: the sampled tokens' log-probs")
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    stop: None = None
    user: str | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None


class InfillRequest(Sampler):
    text: str = Field(..., max_length=MAX_CHARS, description="text with [MASK], [MASK:n], [MASK:a-b] holes")
    logprobs: bool = False


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    text: str = Field(..., min_length=1, max_length=MAX_CHARS,
                      description="the spans to score written [[like this]]; the whole text if none")
    order: Literal["left-to-right", "random"] = "left-to-right"
    seed: int = Field(0, ge=0, le=2**62)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
