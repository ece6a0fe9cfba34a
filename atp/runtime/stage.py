"""Apply one pruner decision to a layout: drop (gather) or mask (hide as keys)."""

from __future__ import annotations

from dataclasses import replace

import torch

from atp.runtime.layout import Layout, compact_positions, left_filled_slots
from atp.runtime.pruner import MergeDecision


def check_decision(decision: torch.Tensor | MergeDecision, layout: Layout, pruner: str, mode: str) -> None:
    """Raise a clear error for a decision of the wrong shape, type or range."""
    if isinstance(decision, MergeDecision):
        if decision.keep.dtype != torch.bool:
            raise ValueError(
                f"pruner {pruner!r} returned a MergeDecision whose keep is {decision.keep.dtype}; use bool."
            )
        for name in ("keep", "replaced", "order"):
            value = getattr(decision, name)
            if value is not None and value.shape != layout.index.shape:
                raise ValueError(
                    f"pruner {pruner!r}: MergeDecision.{name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(layout.index.shape)}."
                )
        if (decision.replaced is None) != (decision.hidden is None):
            raise ValueError(f"pruner {pruner!r}: MergeDecision needs both hidden and replaced, or neither.")
        if decision.replaced is not None and bool((decision.replaced & ~decision.keep).any()):
            raise ValueError(f"pruner {pruner!r}: a merged token must sit in a kept slot (replaced & ~keep).")
        return
    if not isinstance(decision, torch.Tensor) or decision.shape != layout.index.shape:
        shape = getattr(decision, "shape", type(decision).__name__)
        raise ValueError(
            f"pruner {pruner!r} returned a decision of shape {shape}; expected a [batch, slots] "
            f"tensor of shape {tuple(layout.index.shape)} (bool keep mask or float keep weights)."
        )
    if decision.dtype != torch.bool:
        if not decision.is_floating_point():
            raise ValueError(f"pruner {pruner!r} returned dtype {decision.dtype}; use bool or float.")
        if mode == "drop":
            raise ValueError(
                f"pruner {pruner!r} returned soft keep weights, but drop mode needs a hard bool "
                "decision. Use mode='mask' for soft masks (training), or threshold the weights."
            )


def apply_merge(
    layout: Layout, hidden: torch.Tensor, decision: MergeDecision
) -> tuple[Layout, torch.Tensor, torch.Tensor]:
    """Write merged tokens into their slots and reorder the kept visual tokens.

    hidden: [B, S, d]. Returns the layout, hidden states and the [B, S] keep mask to
    apply next (drop or mask): the reordering only permutes tokens among kept visual
    slots, so the set of removed slots, and with it the compaction, is unchanged.
    """
    if decision.replaced is not None:
        replaced = decision.replaced & layout.visual_alive()
        hidden = torch.where(replaced[..., None], decision.hidden.to(hidden.dtype), hidden)
        merged = replaced if layout.merged is None else layout.merged | replaced
        layout = replace(layout, merged=merged)
    if decision.order is not None:
        source = reorder_plan(decision.keep & layout.visual_alive(), decision.order)
        hidden = torch.gather(hidden, 1, source[..., None].expand(-1, -1, hidden.shape[-1]))
        layout = layout.permute(source)
    return layout, hidden, decision.keep


def reorder_plan(movable: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[B, S] long gather plan: the movable slots, in slot order, receive the movable
    tokens sorted by `key` (stable); every other slot keeps its token."""
    inf = torch.tensor(float("inf"), device=key.device)
    slot = torch.arange(movable.shape[1], device=movable.device).expand_as(movable)
    slots = torch.sort(torch.where(movable, slot.double(), inf.double()), dim=1, stable=True).indices
    tokens = torch.sort(torch.where(movable, key.double(), inf.double()), dim=1, stable=True).indices
    return slot.clone().scatter_(1, slots, tokens)


def check_protected(decision: torch.Tensor, protected: torch.Tensor, layout: Layout, pruner: str) -> None:
    """For a pruner that prunes prompt text: a clear error when its decision rejects (or, soft, weighs
    below 1) a slot it may never prune. protected: [B, S] long, 0 (prunable or ignored), 1 (the last
    prompt token: the query of the next token), 2 (an answer token, training)."""
    rejected = ~decision if decision.dtype == torch.bool else decision < 1.0
    hit = rejected & (protected > 0) & layout.valid & layout.alive
    if bool(hit.any()):
        b, slot = (int(v) for v in hit.nonzero()[0])
        position = int(layout.index[b, slot])
        what = (
            "the last prompt token (the query of the next token)"
            if int(protected[b, slot]) == 1
            else "an answer token (labels != -100)"
        )
        raise ValueError(
            f"pruner {pruner!r} pruned {what} at position {position} of sample {b}; only prompt tokens before the "
            "last one may be pruned. Keep that slot in the decision (ctx.prunable marks the slots that may go)."
        )


def apply_drop(
    layout: Layout, hidden: torch.Tensor, keep: torch.Tensor, compact: bool, prunable: torch.Tensor | None = None
) -> tuple[Layout, torch.Tensor]:
    """Physically remove the prunable tokens `keep` rejects.

    layout: the current layout; hidden: [B, S, d]; keep: [B, S] bool (slots outside `prunable` are
    kept whatever it says); compact: renumber positions of the remaining tokens contiguously;
    prunable: [B, S] bool slots a decision may remove, default the visual tokens present.
    Returns the new layout and the gathered hidden states [B, S', d].
    """
    prunable = layout.visual_alive() if prunable is None else prunable
    removed = prunable & ~keep
    if compact:
        layout = _compacted(layout, removed)
    slot, filled = drop_slots(layout, keep, prunable)
    return layout.gather(slot, filled), gather_rows(hidden, slot)


def drop_slots(
    layout: Layout, keep: torch.Tensor, prunable: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, filled) [B, S']: `apply_drop`'s gather plan (`left_filled_slots` of the slots it keeps;
    prunable as in `apply_drop`)."""
    prunable = layout.visual_alive() if prunable is None else prunable
    return left_filled_slots(layout.valid & ~(prunable & ~keep))


def gather_rows(values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """values [B, S, D] -> [B, S', D]: row slot[b, i] of sample b in new slot i."""
    return torch.gather(values, 1, slot[..., None].expand(-1, -1, values.shape[-1]))


def apply_mask(layout: Layout, decision: torch.Tensor, compact: bool, prunable: torch.Tensor | None = None) -> Layout:
    """Hide rejected prunable tokens from every later query (sequence length unchanged).

    decision: [B, S] bool keep mask, or float keep weights in [0, 1] that multiply the
    weights of earlier stages (soft masks compose as a product across modules);
    prunable: [B, S] bool slots a decision may hide, default the visual tokens present.
    """
    prunable = layout.visual_alive() if prunable is None else prunable
    if decision.dtype == torch.bool:
        removed = prunable & ~decision
        if compact:
            layout = _compacted(layout, removed)
        return replace(layout, alive=layout.alive & ~removed)
    if compact:
        raise ValueError("compact position ids need hard decisions; soft masks keep original positions.")
    step = torch.where(prunable, decision.to(torch.float32), torch.ones_like(decision, dtype=torch.float32))
    weight = step if layout.weight is None else layout.weight * step
    return replace(layout, weight=weight)


def _compacted(layout: Layout, removed: torch.Tensor) -> Layout:
    position = compact_positions(layout.position, removed)
    return replace(layout, position=position, shift=layout.shift + removed.sum(1))


def remaining_visual(layout: Layout, visual_index: torch.Tensor) -> list[torch.Tensor]:
    """Sorted image-token indices still present per sample (soft weights count if >= 0.5;
    merged tokens are not original tokens and are not listed)."""
    present = present_visual(layout)
    if layout.merged is not None:
        present = present & ~layout.merged
    return [torch.sort(visual_index[b][present[b]]).values.cpu() for b in range(present.shape[0])]


def present_text(layout: Layout, text: torch.Tensor) -> torch.Tensor:
    """[B, S] bool slots holding a token of `text` ([B, S] bool, e.g. prompt text tokens gathered to
    the slots) that count as processed by a layer seeing `layout` (soft weights count if >= 0.5)."""
    present = text & layout.valid & layout.alive
    if layout.weight is not None:
        present = present & (layout.weight >= 0.5)
    return present


def present_visual(layout: Layout) -> torch.Tensor:
    """[B, S] bool visual tokens that count as processed by a layer seeing `layout`."""
    present = layout.visual_alive()
    if layout.weight is not None:
        present = present & (layout.weight >= 0.5)
    return present
