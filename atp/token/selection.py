"""How many visual tokens a cut keeps and which: budget helpers shared by the token pruners."""

from __future__ import annotations

import math

import torch


def check_keep_ratio(name: str, keep_ratio: float) -> float:
    if not isinstance(keep_ratio, (int, float)) or not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(
            f"{name}: keep_ratio must be in (0, 1] (the fraction of visual tokens kept), got {keep_ratio!r}."
        )
    return float(keep_ratio)


class TokenBudget:
    """How many visual tokens a cut keeps: `keep_tokens` (a count per sample) when given,
    else `keep_ratio` (a fraction of the tokens present, rounded half up, at least 1)."""

    def __init__(self, name: str, keep_ratio: float | None = None, keep_tokens: int | None = None) -> None:
        self.name = name
        if keep_tokens is not None:
            if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or keep_tokens < 1:
                raise ValueError(f"{name}: keep_tokens must be a positive integer, got {keep_tokens!r}.")
            self.keep_tokens, self.keep_ratio = int(keep_tokens), None
        elif keep_ratio is not None:
            self.keep_tokens, self.keep_ratio = None, check_keep_ratio(name, keep_ratio)
        else:
            raise ValueError(f"{name}: give a budget, keep_ratio (a fraction) or keep_tokens (a count).")

    def count(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """[B] tokens to keep for [B] tokens present; a clear error if keep_tokens exceeds them."""
        if self.keep_tokens is None:
            return kept_count(num_tokens, self.keep_ratio)
        short = (num_tokens > 0) & (num_tokens < self.keep_tokens)
        if bool(short.any()):
            raise ValueError(
                f"{self.name}: keep_tokens={self.keep_tokens} is more than the {int(num_tokens[short].min())} "
                "visual tokens of a sample. Choose keep_tokens no larger than the visual tokens per image, "
                "or give a keep_ratio."
            )
        return torch.where(num_tokens > 0, self.keep_tokens, 0).to(num_tokens)


def kept_count(num_tokens: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """[B] tokens to keep: round(n * keep_ratio), at least 1 where n > 0 (round half up)."""
    keep = torch.floor(num_tokens.double() * keep_ratio + 0.5).long()
    return torch.where(num_tokens > 0, keep.clamp_min(1), keep).clamp_max(num_tokens)


def top_k_per_sample(score: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the k[b] highest-scoring candidate slots of each row b.

    score: [B, S] float; candidates: [B, S] bool; k: [B] long. Ties break towards the
    earlier slot (stable), so the choice is deterministic.
    """
    masked = score.float().masked_fill(~candidates, -math.inf)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < k[:, None]) & candidates


def apportion(sizes: list[int], total: int) -> list[int]:
    """Split `total` over groups of `sizes` tokens in proportion to their sizes: each gets the floor
    of its quota `total * size / sum(sizes)`, and what is left goes one by one to the largest
    remainders (ties: the earlier group). The parts sum to `total` (at most sum(sizes))."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    total = min(total, whole)
    parts = [total * size // whole for size in sizes]
    remainders = sorted(range(len(sizes)), key=lambda g: (-(total * sizes[g] % whole), g))
    for group in remainders[: total - sum(parts)]:
        parts[group] += 1
    return parts


def view_groups(view: torch.Tensor, candidates: torch.Tensor) -> list[torch.Tensor]:
    """The candidate slots (candidates [S] bool) of one sample grouped by their tower view
    (view [S] long), views in ascending order, slots in order within each."""
    slots = candidates.nonzero()[:, 0]
    return [slots[view[slots] == v] for v in torch.unique(view[slots]).tolist()]


def top_k_per_view(score: torch.Tensor, candidates: torch.Tensor, view: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: k[b] candidate slots of row b, `apportion`ed over its views (image crops) by their
    candidate counts, the highest-scoring within each view (ties: the earlier slot). With one view
    per sample this is `top_k_per_sample`. score [B, S] float; candidates [B, S] bool; view [B, S]
    long; k [B] long."""
    keep = torch.zeros_like(candidates)
    for b in range(score.shape[0]):
        groups = view_groups(view[b], candidates[b])
        for slots, count in zip(groups, apportion([len(g) for g in groups], int(k[b]))):
            order = torch.sort(score[b, slots].float(), descending=True, stable=True).indices
            keep[b, slots[order[:count]]] = True
    return keep


def require_one_image_on_a_fixed_grid(name: str, ctx) -> tuple[int, int]:
    """(rows, cols) of the model's one fixed image grid (LLaVA-1.5), for methods whose reference
    works on one image's grid; a clear error for several images per prompt or for models that
    give each image its own grid or several crops (Qwen-VL, LLaVA-NeXT, InternVL tiles)."""
    if ctx.grid is None:
        raise ValueError(
            f"{name} works on one image's fixed grid of visual tokens (LLaVA-1.5, as its reference); this model "
            "gives each image its own grid or several crops, which it does not support. Use a method that "
            "works per crop or needs no grid (fastv, pdrop, sparsevlm, divprune, dart, ...)."
        )
    rows, cols = ctx.grid
    if bool((ctx.num_visual > rows * cols).any()):
        raise ValueError(
            f"{name} works on one image per prompt (its reference's setting); this prompt has several images. "
            "Use a method without that limit (fastv, pdrop, sparsevlm, divprune, dart, ...)."
        )
    return rows, cols


def require_one_image_per_sample(name: str, ctx) -> list[tuple[int, int] | None]:
    """Per sample, (rows, cols) of the grid of its one image's visual tokens in the current slots (None
    for a sample without any), for methods whose reference works on one image's raster grid; the
    image may have its own grid (Qwen-VL). A clear error for several images per prompt, or an image
    split into several crops or tiles (LLaVA-NeXT, InternVL)."""
    geometry, grids = ctx.geometry, []
    for b in range(ctx.visual.shape[0]):
        visual = ctx.visual[b]
        if not bool(visual.any()):
            grids.append(None)
            continue
        if bool((geometry.crop[b, visual] != 0).any()):
            raise ValueError(
                f"{name} works on one image's grid of visual tokens (as its reference); this model splits the "
                "image into several crops or tiles, each with its own grid, which it does not support. Use a "
                "method that works per crop or needs no grid (fastv, pdrop, sparsevlm, divprune, dart, ...)."
            )
        if len(set(geometry.image[b, visual].tolist())) > 1:
            raise ValueError(
                f"{name} works on one image per prompt (its reference's setting); this prompt has several "
                "images. Use a method without that limit (fastv, pdrop, sparsevlm, divprune, dart, ...)."
            )
        first = int(visual.nonzero()[0, 0])
        grids.append((int(geometry.rows[b, first]), int(geometry.cols[b, first])))
    return grids
