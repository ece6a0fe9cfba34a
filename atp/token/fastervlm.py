"""`fastervlm` (Zhang et al., 2024, "[CLS] attention is all you need"): prune at the vision
encoder's output by the [CLS] token's attention.

Score: the [CLS] row of vision layer -2's attention (`[:, :, 0, 1:]`), averaged over heads;
keep the top round(N * keep_ratio) (or `keep_tokens`) visual tokens in their original order, before the LLM.
Images of several crops (LLaVA-NeXT) are scored per crop, each by its own [CLS], as in the
reference's LLaVA-NeXT code: the budget is apportioned over the crops by their tokens and each
crop keeps its top tokens [ours: the reference keeps round(576 * ratio) of every crop's tower
outputs before unpadding].
Positions are compacted (the tokens are removed before the LLM). The attention row is
recomputed from the layer's captured q/k, so the vision tower keeps running under SDPA.
On M-RoPE families the default (`position_ids="reference"`) keeps original ids [ours].
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, top_k_per_view


@register
class FasterVLM(TokenPruner):
    name = "fastervlm"
    reference_position_ids = "compact"  # [paper] the reference code compacts positions
    needs_vision_cls = True  # scores by the tower's [CLS] row

    def __init__(
        self,
        keep_ratio: float = 0.25,
        keep_tokens: int | None = None,
        vision_layer: int = -2,
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio, keep_tokens)
        self.vision_layer = int(vision_layer)

    def vision_probe_layers(self) -> set[int]:
        return {self.vision_layer}

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        score = ctx.vision_cls_attention(self.vision_layer).mean(1)  # [B, S]
        view = ctx.geometry.tower_view()  # the crop (tower input) each token came from
        return top_k_per_view(score, ctx.visual, view, self.budget.count(ctx.visual_counts()))
