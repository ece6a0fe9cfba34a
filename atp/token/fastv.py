"""`fastv` (Chen et al., 2024): drop visual tokens before LLM layer K.

Score: attention of layer K-1 from the last prompt token to each visual token, averaged
over heads. Keep the top round(N * keep_ratio) (or `keep_tokens`). Kept tokens keep their original positions.
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, top_k_per_sample


@register
class FastV(TokenPruner):
    name = "fastv"

    def __init__(
        self, layer: int = 2, keep_ratio: float = 0.5, keep_tokens: int | None = None, position_ids: str = "original"
    ) -> None:
        if not isinstance(layer, int) or layer < 1:
            raise ValueError(
                f"fastv: layer K must be an integer >= 1 (it scores with layer K-1's attention), got {layer!r}."
            )
        super().__init__([layer], position_ids)
        self.layer = layer
        self.budget = TokenBudget(self.name, keep_ratio, keep_tokens)

    def probe_layers(self) -> set[int]:
        return {self.layer - 1}

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        rows = ctx.attention(self.layer - 1, ctx.last_prompt[:, None])  # [B, H, 1, S]
        score = rows.mean(1)[:, 0]  # [B, S]
        return top_k_per_sample(score, ctx.visual, self.budget.count(ctx.visual_counts()))
