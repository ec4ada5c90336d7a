"""A learned draft head (EAGLE/Medusa style): drafts a block's positions one after another.

The self-draft queries the next k positions of the order together, each seeing only the known
tokens, so each draft is a draw from its position's marginal and ignores the drafts before it.
The head reads the model's final query-stream state ``h_i`` of each block position (from the
draft pass, or from the oracle pass's lookahead queries in one-pass rounds) and runs a small GRU
over the block, left to right: step i sees ``h_i``, the embedding of the token before it in the
order (the draft it just made, or the last decoded token), the step index and the distance
between the two positions. Its output is a correction added to ``h_i``, read through the model's
own frozen LM head (tied embeddings), so an untrained head (the correction starts at zero) drafts
exactly what the self-draft does. The sampler turns the logits into the row's target distribution
and records it as the draft's proposal, so verification keeps ASSD exact whatever the head says
(docs/design.md, "Learned draft head").

Stored beside its model as ``draft_head.safetensors`` + ``draft_head.json``; ``load_head`` checks
that a head matches its model (d_model, vocabulary) and reports a corrupt file clearly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

HEAD_WEIGHTS = "draft_head.safetensors"
HEAD_CONFIG = "draft_head.json"
MAX_GAP = 8  # distances to the previous position >= this share one embedding


@dataclasses.dataclass(frozen=True)
class DraftHeadConfig:
    d_model: int
    vocab_size: int
    d_hidden: int = 384
    max_steps: int = 16  # step indices >= this share one embedding

    def to_dict(self) -> dict:
        return {"kind": "asarm-draft-head", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> DraftHeadConfig:
        if not isinstance(data, dict) or data.get("kind") != "asarm-draft-head":
            raise CheckpointError(f"{source}: not an asarm draft-head config (no \"kind\": \"asarm-draft-head\")")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            config = cls(**{k: v for k, v in data.items() if k in fields})
        except TypeError as exc:
            raise CheckpointError(f"{source}: incomplete draft-head config ({exc})") from None
        if not all(isinstance(getattr(config, f), int) and getattr(config, f) > 0 for f in fields):
            raise CheckpointError(f"{source}: draft-head sizes must be positive integers, got {data}")
        return config


class DraftHead(nn.Module):
    """The head's own parameters; the embedding and LM head are the model's, passed in (frozen)."""

    def __init__(self, config: DraftHeadConfig):
        super().__init__()
        self.config = config
        d, dh = config.d_model, config.d_hidden
        self.inp = nn.Linear(2 * d, dh)
        self.step_emb = nn.Embedding(config.max_steps, dh)
        self.gap_emb = nn.Embedding(MAX_GAP, dh)
        self.cell = nn.GRUCell(dh, dh)
        self.mid = nn.Linear(2 * dh, dh)
        self.out = nn.Linear(dh, d)
        nn.init.zeros_(self.out.weight)  # starts as the self-draft: output == the model's own state
        nn.init.zeros_(self.out.bias)

    # tanh-approximated GELU: exact GELU's erf is very slow on CPUs for some inputs of the one-row
    # tensors a drafting step works on (denormal intermediates), ~10-1000x a normal call
    def _input(self, hidden, prev_emb, step, gap):
        return F.gelu(self.inp(torch.cat([hidden, prev_emb], -1))
                      + self.step_emb(step.clamp(max=self.config.max_steps - 1)) + self.gap_emb(gap.clamp(0, MAX_GAP - 1)), approximate="tanh")

    def _output(self, hidden, u, state):
        return hidden + self.out(F.gelu(self.mid(torch.cat([u, state], -1)), approximate="tanh"))

    def step(self, hidden: torch.Tensor, prev_emb: torch.Tensor, step: torch.Tensor, gap: torch.Tensor,
             state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafting step for a batch: hidden, prev_emb [n, d_model]; step, gap [n] long;
        state [n, d_hidden] or None (the block's first step). Returns (the corrected query
        state [n, d_model] to read through the LM head, the new state)."""
        u = self._input(hidden, prev_emb, step, gap)
        state = self.cell(u, state)
        return self._output(hidden, u, state), state

    def forward_blocks(self, hidden: torch.Tensor, prev_emb: torch.Tensor, step: torch.Tensor,
                       gap: torch.Tensor) -> torch.Tensor:
        """``step`` over whole sequences of blocks at once (training): [B, M, ...] inputs, the
        state restarting wherever ``step`` is 0. The same arithmetic as calling ``step`` per
        position."""
        u = self._input(hidden, prev_emb, step, gap)
        states, state = [], torch.zeros(u.shape[0], u.shape[2], dtype=u.dtype, device=u.device)
        for j in range(u.shape[1]):
            state = self.cell(u[:, j], state * (step[:, j, None] > 0))
            states.append(state)
        return self._output(hidden, u, torch.stack(states, 1))


def head_readout(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (frozen) word embedding [V, d] and LM-head bias [V], in float32."""
    return (model.transformer.word_embedding.weight.detach().float(), model.lm_loss.bias.detach().float())


def check_head(config: DraftHeadConfig, model_config, source: str) -> None:
    problems = [f"{name} {getattr(config, name)} (the model's: {getattr(model_config, name)})"
                for name in ("d_model", "vocab_size") if getattr(config, name) != getattr(model_config, name)]
    if problems:
        raise CheckpointError(f"{source}: this draft head does not match its model: " + ", ".join(problems)
                              + "; train one for this model with `asarm train-draft`")


def head_files(directory) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / HEAD_WEIGHTS, directory / HEAD_CONFIG


def has_head(directory) -> bool:
    return head_files(directory)[0].is_file()


def load_head(directory, model_config, device=None) -> DraftHead:
    """The draft head saved in ``directory``, checked against ``model_config``; float32 on ``device``."""
    from safetensors.torch import load_file

    weights, config_path = head_files(directory)
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: {HEAD_WEIGHTS} without {HEAD_CONFIG}: the head's sizes are unknown")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: unreadable draft-head config ({exc})") from None
    config = DraftHeadConfig.from_dict(data, str(config_path))
    check_head(config, model_config, str(directory))
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: corrupt or truncated draft-head file ({type(exc).__name__}: {exc})") from None
    head = DraftHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise CheckpointError(f"{weights}: draft-head tensors do not match its config ({', '.join(wrong[:5])})")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.to(device=device).eval()


def save_head(head: DraftHead, directory, dtype: torch.dtype = torch.bfloat16, meta: dict | None = None) -> Path:
    """Write ``draft_head.safetensors`` + ``draft_head.json`` into ``directory`` atomically (each
    file written beside itself and renamed; the weights first, so a config never names missing
    weights). ``meta`` (training facts) goes into the json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, config_path = head_files(directory)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    for path, write in ((weights, lambda p: save_file(tensors, str(p))),
                        (config_path, lambda p: p.write_text(json.dumps({**head.config.to_dict(), **(meta or {})},
                                                                        indent=2) + "\n"))):
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    return weights

