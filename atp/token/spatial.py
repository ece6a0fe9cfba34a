"""`spatial`: keep a uniform grid of each image's visual tokens at the stride that meets the budget.

The stride is the smallest s whose grid (every s-th row and column, starting at 0) holds
no more than round(N_image * keep_ratio) (or `keep_tokens`) tokens. Kept tokens keep their original positions.
Images with their own grids (Qwen2-VL's dynamic resolution) each get the stride of their own
grid and budget [ours].
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
        geometry = ctx.geometry
        keep = torch.zeros_like(ctx.visual)
        sizes = torch.stack([geometry.rows[ctx.visual], geometry.cols[ctx.visual]], 1).unique(dim=0)
        for rows, cols in sizes.tolist():  # one stride per grid size
            stride = grid_stride(rows, cols, int(self.budget.count(torch.tensor([rows * cols]))[0]))
            on_grid = (geometry.row % stride == 0) & (geometry.col % stride == 0)
            keep |= on_grid & (geometry.rows == rows) & (geometry.cols == cols)
        return keep & ctx.visual
