"""Exact content cache for chain sampling (docs/design.md, "Exact cache").

With fixed ranks, a content state depends only on tokens of lower rank, which never change once
decoded. So the keys and values of every committed content row stay valid for the rest of the
run and each pass computes only its new rows. Buffers are allocated once per run:

    keys[layer], values[layer]: [B, capacity, n_head, d_head]
    key_pos, key_rank:          [B, capacity]
    length:                     [B] committed slots per row

A pass writes its new content rows after each row's committed slots (``write_slots`` and
``write_layer``), attends to slots ``[0, max(length) + N)`` and afterwards ``commit`` keeps, per
row, a prefix of the new rows: accepted drafts are committed straight from the oracle pass, and
rejected ones are simply overwritten by the next pass (their key rank is reset to ``NO_KEY`` so
no row can see them).
"""

from __future__ import annotations

import torch

from .model import NO_KEY


class ContentCache:
    def __init__(self, model, batch_size: int, capacity: int):
        cfg = model.config
        shape = (batch_size, capacity, cfg.n_head, cfg.d_head)
        kw = dict(device=model.device, dtype=model.dtype)
        self.keys = [torch.zeros(shape, **kw) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, **kw) for _ in range(cfg.n_layer)]
        self.key_pos = torch.zeros(batch_size, capacity, dtype=torch.long, device=model.device)
        self.key_rank = torch.full((batch_size, capacity), NO_KEY, dtype=torch.long, device=model.device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=model.device)
        self.capacity = capacity
        self._slots = self._rows = self._run = None
        self._span = 0

    @property
    def batch_size(self) -> int:
        return self.key_pos.shape[0]

    def nbytes_per_slot(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[2] * k.shape[3] * k.element_size()

    def write_slots(self, content_pos: torch.Tensor, content_rank: torch.Tensor):
        """Place this pass's new content rows; returns (key_pos, key_rank) over the attended span."""
        B, N = content_pos.shape
        self._slots = self.length[:, None] + torch.arange(N, device=self.length.device)
        self._span = int((self.length.max() + N).item())
        if self._span > self.capacity:
            # rows that joined a running batch: one row's committed slots plus another row's (padded)
            # new rows can pass any per-row bound; the new slots hold no key (NO_KEY), so it stays exact
            self.add_rows(0, self._span)
        self._rows = torch.arange(B, device=self.length.device)[:, None]  # the same for every layer
        # one row: its new slots are the range before the span, written as a slice (a plain copy;
        # an indexed write costs several times more, once per layer and tensor)
        self._run = slice(self._span - N, self._span) if B == 1 else None
        self._write(self.key_pos, content_pos.long())
        self._write(self.key_rank, content_rank.long())
        return self.key_pos[:, : self._span], self.key_rank[:, : self._span]

    def _write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        if self._run is not None:
            buffer[:, self._run] = new
        else:
            buffer[self._rows, self._slots] = new

    def new_slot_values(self, new: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """[B, span]: ``new`` [B, N] at the last pass's new slots, ``fill`` at the committed ones
        (a per-key property of this pass only, such as its rows' draft branches)."""
        out = torch.full((new.shape[0], self._span), fill, dtype=new.dtype, device=new.device)
        if self._run is not None:
            out[:, self._run] = new
        else:
            out[self._rows, self._slots] = new
        return out

    def write_layer(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        self._write(self.keys[layer], k_new)
        self._write(self.values[layer], v_new)
        return self.keys[layer][:, : self._span], self.values[layer][:, : self._span]

    def commit(self, kept: torch.Tensor, chosen: dict[int, list[int]] | None = None) -> None:
        """Keep the first ``kept[b]`` new rows of the last pass for each row b; forget the rest.
        ``chosen`` {b: new-row indices, ascending}: row b keeps those rows instead (moved to its
        first new slots, in order), e.g. the accepted branch of a multi-draft pass."""
        kept = kept.to(self.length.device).long()
        for b, rows in (chosen or {}).items():
            if rows != list(range(len(rows))):
                self._gather_new_slots(b, rows)
            kept[b] = len(rows)
        new_len = self.length + kept
        slots = torch.arange(self._span, device=self.length.device)
        forget = (slots[None, :] >= new_len[:, None]) & (slots[None, :] < self._span)
        self.key_rank[:, : self._span].masked_fill_(forget, NO_KEY)
        self.length = new_len

    def _gather_new_slots(self, b: int, rows: list[int]) -> None:
        start = int(self.length[b])
        source = torch.tensor(rows, device=self.length.device) + start
        for buffer in (*self.keys, *self.values, self.key_pos, self.key_rank):
            buffer[b, start : start + len(rows)] = buffer[b].index_select(0, source)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing compute)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.key_pos = self.key_pos[rows]
        self.key_rank = self.key_rank[rows]
        self.length = self.length[rows]

    def add_rows(self, count: int, capacity: int) -> None:
        """Append ``count`` empty rows (a row joining a running batch); grow every row's slots to
        ``capacity`` if the newcomer needs more. Existing rows keep their committed slots."""
        extra_slots = max(0, capacity - self.capacity)
        self.capacity += extra_slots
        self.keys = [_grown(k, count, extra_slots, 0) for k in self.keys]
        self.values = [_grown(v, count, extra_slots, 0) for v in self.values]
        self.key_pos = _grown(self.key_pos, count, extra_slots, 0)
        self.key_rank = _grown(self.key_rank, count, extra_slots, NO_KEY)
        self.length = torch.cat([self.length, self.length.new_zeros(count)])


def _grown(t: torch.Tensor, rows: int, slots: int, fill) -> torch.Tensor:
    """``t`` [B, S, ...] padded with ``fill`` to [B + rows, S + slots, ...]."""
    out = torch.full((t.shape[0] + rows, t.shape[1] + slots, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out
