"""`spatial`: keep a uniform grid of each image's visual tokens at the stride that meets the budget.

The stride is the smallest s whose grid (every s-th row and column, starting at 0) holds
no more than round(N_image * keep_ratio) (or `keep_tokens`) tokens. Kept tokens keep their original positions.
"""

from __future__ import annotations

import math

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget


def grid_stride(rows: int, cols: int, budget: int) -> int:
    """Smallest stride s >= 1 with ceil(rows / s) * ceil(cols / s) <= budget."""
    stride = 1
    while math.ceil(rows / stride) * math.ceil(cols / stride) > max(1, budget):
        stride += 1
    return stride


@register
class SpatialPruner(TokenPruner):
    name = "spatial"

    def __init__(
        self, layer: int = 0, keep_ratio: float = 0.25, keep_tokens: int | None = None, position_ids: str = "original"
    ) -> None:
        super().__init__([layer], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio, keep_tokens)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        rows, cols = ctx.grid
        stride = grid_stride(rows, cols, int(self.budget.count(torch.tensor([rows * cols]))[0]))
        within = ctx.visual_index.clamp_min(0) % (rows * cols)
        on_grid = (within // cols % stride == 0) & (within % cols % stride == 0)
        return on_grid & ctx.visual
