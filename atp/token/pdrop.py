"""`pdrop` (PyramidDrop, Xing et al., 2024): drop visual tokens in stages.

At the end of layer l-1 (before layer l), apply layer l's input norm and q/k projections
with RoPE to the hidden states, take the last instruction token's query, softmax over
the sequence, average over heads, and keep the top-k of the remaining visual tokens.
`keep_ratios` are cumulative fractions of the N visual tokens at the LLM input (or
`keep_tokens`, cumulative counts, which take precedence).
Positions are compacted after each stage, as in the reference code.
On M-RoPE families (Qwen-VL) the default (`position_ids="reference"`) keeps original ids [ours].
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, check_keep_ratio, top_k_per_sample


@register
class PyramidDrop(TokenPruner):
    name = "pdrop"
    reference_position_ids = "compact"  # [paper] the reference code compacts positions

    def __init__(
        self,
        layers: list[int] = (8, 16, 24),
        keep_ratios: list[float] = (0.5, 0.25, 0.125),
        keep_tokens: list[int] | None = None,
        position_ids: str = "reference",
    ) -> None:
        super().__init__(list(layers), position_ids)
        budgets = (
            list(keep_tokens) if keep_tokens is not None else [check_keep_ratio(self.name, r) for r in keep_ratios]
        )
        what = "keep_tokens" if keep_tokens is not None else "keep ratios"
        if len(budgets) != len(self.layers):
            raise ValueError(f"pdrop: {len(budgets)} {what} for {len(self.layers)} layers {list(self.layers)}.")
        if any(b > a for a, b in zip(budgets, budgets[1:])):
            raise ValueError(f"pdrop: cumulative {what} must not increase, got {budgets}.")
        if 0 in self.layers:
            raise ValueError("pdrop: stages end a layer, so layers must be >= 1.")
        by_count = keep_tokens is not None
        self.budgets = {
            layer: TokenBudget(self.name, keep_tokens=b) if by_count else TokenBudget(self.name, keep_ratio=b)
            for layer, b in zip(self.layers, budgets)
        }

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        rows = ctx.attention(ctx.layer, ctx.last_prompt[:, None])  # layer l's q/k on its input
        score = rows.mean(1)[:, 0]
        keep = self.budgets[ctx.layer].count(ctx.num_visual).clamp_max(ctx.visual_counts())
        return top_k_per_sample(score, ctx.visual, keep)
