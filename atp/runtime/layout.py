"""Which original tokens sit in which slot of the sequence a decoder layer processes.

In drop mode each pruning stage gathers the surviving tokens of every sample, keeps
their order, and left-fills shorter samples with empty slots so the batch stays
rectangular and the last slot is the last real token of every sample (as for
left-padded generation). In mask mode the layout never changes; pruned tokens stay
in place and are hidden from attention by an additive key bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOFT_MASK_FLOOR = 1e-6  # soft keep weight m enters attention as log(max(m, floor))


@dataclass
class Layout:
    """Per-slot bookkeeping for one stage (all tensors [B, S_l]).

    index:     original sequence position held by each slot (0 for empty fill slots)
    valid:     slot holds a real token (not original padding, not a fill slot)
    alive:     token is visible as a key (False = pruned in mask mode)
    weight:    soft keep weight in [0, 1] (mask mode with soft masks), else None
    position:  position id the layer uses for the slot's rotary embedding
    visual:    slot holds a visual (image) token
    shift:     [B] how far positions were compacted so far: tokens appended later
               (decode steps) use position `original - shift`
    merged:    slot holds a merged token (token-merging methods) in place of the original
               token `index`; None when nothing was merged
    rope:      [B, S_l, R] rotary ids of each slot's token on R axes (M-RoPE: temporal, height,
               width), kept from the input; None when the rotary id is `position`
    """

    index: torch.Tensor
    valid: torch.Tensor
    alive: torch.Tensor
    weight: torch.Tensor | None
    position: torch.Tensor
    visual: torch.Tensor
    shift: torch.Tensor
    merged: torch.Tensor | None = None
    rope: torch.Tensor | None = None

    @classmethod
    def initial(
        cls, valid: torch.Tensor, position: torch.Tensor, visual: torch.Tensor, rope: torch.Tensor | None = None
    ) -> Layout:
        batch, length = valid.shape
        index = torch.arange(length, device=valid.device).expand(batch, length)
        shift = torch.zeros(batch, dtype=torch.long, device=valid.device)
        return cls(index, valid, torch.ones_like(valid), None, position, visual, shift, rope=rope)

    @property
    def length(self) -> int:
        return self.index.shape[1]

    def visible(self) -> torch.Tensor:
        """[B, S] bool: slots that later queries may attend to."""
        return self.valid & self.alive

    def visual_alive(self) -> torch.Tensor:
        """[B, S] bool: visual tokens still present."""
        return self.visual & self.valid & self.alive

    def gather(self, slot: torch.Tensor, filled: torch.Tensor) -> Layout:
        """A new layout holding, for every new slot, old slot `slot[b, i]` (filled[b, i])."""
        take = lambda t: None if t is None else torch.gather(t, 1, slot)  # noqa: E731
        return Layout(
            index=take(self.index),
            valid=take(self.valid) & filled,
            alive=take(self.alive) & filled,
            weight=take(self.weight),
            position=take(self.position),
            visual=take(self.visual) & filled,
            shift=self.shift,
            merged=take(self.merged),
            rope=_take_rows(self.rope, slot),
        )

    def permute(self, source: torch.Tensor) -> Layout:
        """Slot i of row b takes the token of old slot `source[b, i]`. The 1-D positions stay with
        the slots (the tokens move, the position ids do not: the order a compacting method gives);
        rotary ids carried per token (`rope`, M-RoPE) move with their tokens, so a kept token keeps
        its own (t, h, w) ids and a merged token those of the slot it was written into [ours]."""
        take = lambda t: None if t is None else torch.gather(t, 1, source)  # noqa: E731
        return Layout(
            index=take(self.index),
            valid=take(self.valid),
            alive=take(self.alive),
            weight=take(self.weight),
            position=self.position,
            visual=take(self.visual),
            shift=self.shift,
            merged=take(self.merged),
            rope=_take_rows(self.rope, source),
        )


def _take_rows(values: torch.Tensor | None, slot: torch.Tensor) -> torch.Tensor | None:
    """values [B, S, R] gathered along the slots: [B, S', R] (None stays None)."""
    if values is None:
        return None
    return torch.gather(values, 1, slot[..., None].expand(-1, -1, values.shape[-1]))


def left_filled_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather plan that keeps the `True` slots of every row, in order, right-aligned.

    keep: [B, S] bool. Returns (slot [B, S'], filled [B, S']) with S' = max row count:
    new slot i of row b takes old slot `slot[b, i]`; `filled` is False for left fill.
    """
    batch, length = keep.shape
    counts = keep.sum(1)
    new_length = int(counts.max()) if batch else 0
    rank = keep.long().cumsum(1) - 1
    target = torch.where(keep, rank + (new_length - counts)[:, None], new_length)
    slot = torch.zeros(batch, new_length + 1, dtype=torch.long, device=keep.device)
    source = torch.arange(length, device=keep.device).expand(batch, length)
    slot.scatter_(1, target, source)
    filled = torch.zeros(batch, new_length + 1, dtype=torch.bool, device=keep.device)
    filled.scatter_(1, target, keep)
    return slot[:, :new_length], filled[:, :new_length]


def compact_positions(position: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Renumber positions so the tokens that remain are contiguous.

    position: [B, S] position ids; removed: [B, S] bool tokens being removed.
    Every token moves down by the number of removed tokens before it.
    """
    removed_before = removed.long().cumsum(1) - removed.long()
    return position - removed_before


def key_bias(layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] additive bias per key: 0 (visible), log(weight) (soft), dtype min (hidden)."""
    minimum = torch.finfo(dtype).min
    if layout.weight is None:
        bias = torch.zeros(layout.index.shape, dtype=dtype, device=layout.index.device)
    else:
        bias = torch.log(layout.weight.clamp_min(SOFT_MASK_FLOOR)).to(dtype)
    return bias.masked_fill(~layout.visible(), minimum)


def causal_only(layout: Layout) -> bool:
    """Whether `prefill_mask(layout)` is exactly the causal triangle: every slot a real, visible token
    with no soft weight (a batch without padding, before any pruning or after a drop)."""
    return layout.weight is None and bool(layout.visible().all())


def prefill_mask(layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S, S] additive causal mask for a layer that sees `layout`.

    Slot order is original order, so causality is slot order. Built with `where`
    (never by adding two minima) so no row can overflow to -inf and produce NaN.
    """
    length = layout.length
    device = layout.index.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    bias = key_bias(layout, dtype)[:, None, None, :]
    minimum = torch.finfo(dtype).min
    return torch.where(causal[None, None], bias, minimum)


def decode_mask(prefix: Layout, new_valid: torch.Tensor, num_cached_new: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, Q, K] additive mask for Q new tokens attending to a cached prefix.

    prefix:         the layout of the prefill at this layer (what the cache holds first)
    new_valid:      [B, T] validity of every token appended after the prefill, this
                    step's Q tokens last (T = num_cached_new + Q)
    num_cached_new: tokens appended by earlier decode steps (already in the cache)
    """
    batch, total_new = new_valid.shape
    queries = total_new - num_cached_new
    device = new_valid.device
    minimum = torch.finfo(dtype).min
    prefix_bias = key_bias(prefix, dtype)[:, None, None, :].expand(batch, 1, queries, prefix.length)
    new_bias = torch.zeros(batch, total_new, dtype=dtype, device=device).masked_fill(~new_valid, minimum)
    query_pos = torch.arange(queries, device=device)[:, None] + num_cached_new
    causal = torch.arange(total_new, device=device)[None, :] <= query_pos
    new_bias = torch.where(causal[None, None], new_bias[:, None, None, :], minimum)
    return torch.cat([prefix_bias, new_bias], dim=-1)
