"""Request bodies. Strict types (no "yes" for a bool, no 1.5 for an int), unknown fields refused,
every number bounded, so bad input is a 400 with the field named, before anything is queued.

The decoding options are not written here: they are ``DecodeConfig``'s fields
(``asarm.sampling.config``), turned into request fields by ``decode_fields``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, create_model

from ..sampling.config import DecodeConfig, field_type, user_fields

MAX_CHARS = 100_000  # texts longer than this are refused before tokenizing
MAX_N = 16           # choices per request (also capped by --max-batch)


class RequestBase(BaseModel):
    """What every generating request takes besides the decoding options."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    seed: int | None = Field(None, ge=0, le=2**62)
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    allow_special: bool = False  # let holes contain <unk>, <s>, padding, ... (excluded by default)
    order: Literal["left-to-right", "random"] = "left-to-right"
    max_hole: int = Field(32, ge=1, le=4096, description="longest length tried for [MASK] / a suffix")
    length_prior: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=4096,
        description="weights of hole lengths 1, 2, ... for [MASK] / a suffix (e.g. `asarm length-prior`); default uniform")

    def decode_config(self) -> DecodeConfig:
        """The request's decoding options as one config (temperature 0 is greedy: ``from_user``)."""
        return DecodeConfig.from_user(**{f.name: getattr(self, f.name) for f in user_fields("server")})


def decode_fields() -> dict:
    """A request field per user-settable ``DecodeConfig`` field: its type (choices as a Literal,
    so a bad value is a 400 naming the field), default, bounds and help."""
    fields = {}
    for f in user_fields("server"):
        kind = field_type(f)
        choices = f.metadata.get("choices")
        annotation = Literal[tuple(choices())] if choices else kind
        if f.default is None:
            annotation = annotation | None
        bounds = {key: f.metadata[key] for key in ("ge", "gt", "le") if key in f.metadata}
        fields[f.name] = (annotation, Field(f.default, description=f.metadata.get("help"), **bounds))
    return fields


def generation_schemas() -> tuple[type[BaseModel], type[BaseModel]]:
    """(CompletionRequest, InfillRequest), built from ``DecodeConfig`` as it is now (the proposer
    registry may have grown since import): ``create_app`` calls it once."""
    fields = decode_fields()
    return (create_model("CompletionRequest", __base__=CompletionBody, **fields),
            create_model("InfillRequest", __base__=InfillBody, **fields))


MAX_PROMPTS = 64      # prompts in one completion request (each its own job of n rows)
MAX_TOP_LOGPROBS = 5  # alternatives per token, as OpenAI's completions API


def _prompt(value):
    """A text, or a list of 1 to MAX_PROMPTS texts (one check, so an error names ``prompt`` alone)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_PROMPTS or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings")
    if any(len(t) > MAX_CHARS for t in texts):
        raise ValueError(f"a prompt has more than {MAX_CHARS} characters")
    return value


class CompletionBody(RequestBase):
    prompt: Annotated[str | list[str], PlainValidator(_prompt)] = Field(
        ..., description="a text, or a list of texts: n choices per text, in the order of the texts")
    suffix: str | None = Field(None, max_length=MAX_CHARS)
    max_tokens: int = Field(16, ge=1, le=100_000)
    hole_length: int | None = Field(None, ge=1, le=100_000,
                                    description="asarm: the middle's length when a suffix is given")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="the sampled tokens' log-probs, and with n >= 1 the n likeliest "
                                             "tokens of each (exact: the target each token was drawn from)")
    echo: bool = Field(False, description="the prompt before the completion in each choice's text")
    best_of: Literal[1] | None = None
    stop: None = None
    user: str | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    guided_regex: str | None = Field(None, max_length=MAX_CHARS, description="vLLM: the hole's text matches this regex")
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=1024,
                                            description="vLLM: the hole's text is one of these")
    guided_json: dict | str | None = Field(None, description="vLLM: the hole's text is JSON of this schema")


class InfillBody(RequestBase):
    text: str = Field(..., max_length=MAX_CHARS, description="text with [MASK], [MASK:n], [MASK:a-b] holes")
    logprobs: bool = False
    constraints: dict[str, dict] | None = Field(
        None, description='{hole index: {"regex": ...} | {"choice": [...]} | {"json_schema": {...}}} (docs/constraints.md)')


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    text: str = Field(..., min_length=1, max_length=MAX_CHARS,
                      description="the spans to score written [[like this]]; the whole text if none")
    order: Literal["left-to-right", "random"] = "left-to-right"
    seed: int = Field(0, ge=0, le=2**62)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
