"""`vispruner` (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues
for Effective Token Pruning in VLMs"; official code Theia-4869/VisPruner): keep important tokens
by the vision tower's [CLS] attention, then diverse ones by removing near-duplicates.

Per image, for a budget of T tokens (`keep_tokens`, or `keep_ratio` of the visual tokens):
- important: T_imp = floor(T * important_ratio) tokens with the highest [CLS] attention of
  vision layer -2 (`[:, :, 0, 1:]`, averaged over heads). The others form the residual, kept
  in descending-score order (ties: the earlier token first).
- diverse: while the residual holds more than T_div = T - T_imp tokens, one round removes
  r = min(8, |residual| - T_div) tokens: split the residual (in its current order) into
  alternating halves, A = positions 0, 2, 4, ... and B = positions 1, 3, 5, ...; score each
  A token by its highest cosine similarity to any B token (image features at the projector
  input); drop the r highest-scoring A tokens (all of A when r > |A|, [ours]); the new
  residual is the remaining A tokens in descending-score order (ties: earlier first),
  followed by B in its order.
- keep the important tokens and the final residual, in their original order, before the LLM;
  positions compacted as in the reference code (original M-RoPE ids where compaction has no
  defined rule [ours]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, require_one_image_on_a_fixed_grid

ROUND_SIZE = 8  # [paper code] at most 8 tokens leave the residual per round


def split_budget(tokens: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) counts for a budget of `tokens` kept tokens (important = floor)."""
    important = int(tokens * important_ratio)
    return important, tokens - important


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, diverse: int) -> torch.Tensor:
    """VisPruner's iterative matching: shrink `residual` to `diverse` indices.

    unit: [N, d] L2-normalised features; residual: [R] long indices into N (its order matters).
    Returns the surviving indices [diverse] in their final residual order.
    """
    while (excess := residual.numel() - diverse) > 0:
        remove = min(ROUND_SIZE, excess)
        evens, odds = residual[0::2], residual[1::2]
        similarity = (unit[evens] @ unit[odds].T).amax(1) if odds.numel() else unit.new_full(evens.shape, -1.0)
        ranked = torch.sort(similarity, descending=True, stable=True).indices
        residual = torch.cat([evens[ranked[remove:]], odds])
    return residual


@register
class VisPruner(TokenPruner):
    name = "vispruner"
    reference_position_ids = "compact"  # [paper] the reference code removes the tokens before the LLM
    needs_vision_cls = True  # scores by the tower's [CLS] row
    needs_vision_features = True

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        important_ratio: float = 0.5,
        vision_layer: int = -2,
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if not isinstance(important_ratio, (int, float)) or not 0.0 <= float(important_ratio) <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be in [0, 1], got {important_ratio!r}.")
        self.important_ratio = float(important_ratio)
        self.vision_layer = int(vision_layer)

    def vision_probe_layers(self) -> set[int]:
        return {self.vision_layer}

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        require_one_image_on_a_fixed_grid("vispruner", ctx)
        counts = self.budget.count(ctx.visual_counts())
        score = ctx.vision_cls_attention(self.vision_layer).mean(1)  # [B, S]
        unit = F.normalize(ctx.vision_features().float(), dim=-1)  # [B, S, dv]
        keep = torch.zeros_like(ctx.visual)
        for b, total in enumerate(counts.tolist()):
            slots = ctx.visual[b].nonzero()[:, 0]  # this image's tokens, original order
            if total == 0:
                continue
            important, diverse = split_budget(total, self.important_ratio)
            ranked = torch.sort(score[b, slots], descending=True, stable=True).indices
            kept = torch.cat([ranked[:important], remove_duplicates(unit[b, slots], ranked[important:], diverse)])
            keep[b, slots[kept]] = True
        return keep
