"""`vtc_cls` (Wang et al., 2024, "[CLS] Token Tells Everything Needed for Training-free Efficient
MLLMs"; official code THU-MIG/VTC-CLS): keep the image tokens with the highest [CLS] attention
summed over the vision tower's later layers, before the LLM.

Score of a token: sum over vision layers l = start_layer, ..., depth - 2 (the reference's
`attentions[start_layer:-1]`) of the [CLS] row of layer l's attention (`[:, :, 0, 1:]`),
averaged over heads. Keep the top `keep_tokens` (or `keep_ratio` of the visual tokens), in
original order; positions compacted, as in the reference (original M-RoPE ids where compaction
has no defined rule [ours]). `start_layer` counts from 0 (16 of CLIP-L's 24 layers by default);
a negative value counts from the end, as a Python slice does.
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, top_k_per_sample


@register
class VTCCLS(TokenPruner):
    name = "vtc_cls"
    reference_position_ids = "compact"  # [paper] the reference removes the tokens before the LLM
    needs_vision_cls = True  # scores by the tower's [CLS] row

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        start_layer: int = 16,
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        self.start_layer = int(start_layer)
        self.score_layers: list[int] = []  # set for the tower at hand by vision_probe_layers_in

    def vision_probe_layers(self) -> set[int]:
        return {-2}  # at least the second-to-last layer; the full range needs the depth

    def vision_probe_layers_in(self, depth: int) -> set[int]:
        """Layers start_layer .. depth - 2 of a tower of `depth` layers (a clear error if empty)."""
        start = self.start_layer + depth if self.start_layer < 0 else self.start_layer
        if not 0 <= start <= depth - 2:
            raise ValueError(
                f"vtc_cls: start_layer={self.start_layer} leaves no layer to score in a vision tower of {depth} "
                f"layers (it scores layers start_layer .. {depth - 2}). Choose start_layer in 0..{depth - 2}, "
                f"or in {-depth}..-2 counting from the end."
            )
        self.score_layers = list(range(start, depth - 1))
        return set(self.score_layers)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        score = sum(ctx.vision_cls_attention(layer).mean(1) for layer in self.score_layers)  # [B, S]
        return top_k_per_sample(score, ctx.visual, self.budget.count(ctx.visual_counts()))
