"""`random`: keep a uniformly random subset of the visual tokens at each given layer.

The subset depends only on (seed, layer, number of visual tokens present), never on the
batch a sample sits in, so batched and batch-1 runs prune identically.
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import check_keep_ratio, kept_count


@register
class RandomPruner(TokenPruner):
    """layers: int or list; keep_ratio: fraction of the visual tokens *present* that each stage
    keeps (a float for all stages, or one per layer); seed: int."""

    name = "random"

    def __init__(
        self,
        layers: int | list[int] = 2,
        keep_ratio: float | list[float] = 0.5,
        seed: int = 0,
        position_ids: str = "original",
    ) -> None:
        super().__init__(layers, position_ids)
        ratios = keep_ratio if isinstance(keep_ratio, (list, tuple)) else [keep_ratio] * len(self.layers)
        if len(ratios) != len(self.layers):
            raise ValueError(f"random: {len(ratios)} keep ratios for {len(self.layers)} layers {list(self.layers)}.")
        self.keep_ratios = {layer: check_keep_ratio(self.name, r) for layer, r in zip(self.layers, ratios)}
        self.seed = int(seed)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        keep = torch.zeros_like(ctx.visual)
        counts = ctx.visual_counts()
        targets = kept_count(counts, self.keep_ratios[ctx.layer])
        for b in range(keep.shape[0]):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer)
            chosen = torch.randperm(int(counts[b]), generator=generator)[: int(targets[b])]
            slots = ctx.visual[b].nonzero()[:, 0]
            keep[b, slots[chosen.to(slots.device)]] = True
        return keep
