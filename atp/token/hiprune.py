"""`hiprune` (Liu et al., 2025, "HiPrune: Training-Free Visual Token Pruning via Hierarchical
Attention in Vision-Language Models"; official code Danielement321/HiPrune, ports for LLaVA-1.5 and
Qwen2.5-VL): anchor tokens from a middle ("object") layer of the vision tower, their neighbours, and
register tokens from a deep layer, before the LLM.

Global attention of a vision layer: its attention averaged over heads and over all queries of the
image ([CLS] included where the tower has one; on Qwen-VL each query attends within its image or
window, as the tower does), summed over the tower patches a visual token covers ([CLS] column
dropped): one score per visual token. (Qwen reference: summed over queries and averaged over the 4
patches, the same order within an image.)
Per sample, one image on its own grid of `cols` columns, for a budget of T tokens (`keep_tokens`,
or `keep_ratio` of the visual tokens):
- anchors: the round(T * alpha / 5) tokens (Python's round, half to even) with the highest
  global attention of vision layer `object_layer` (counted from 1, as the reference);
- buffers: each anchor's flat raster neighbours i - 1, i + 1, i - cols, i + cols, clamped to
  0 .. N - 1 (as the reference: i +- 1 wraps across rows);
- registers: the T - |anchors and buffers| other tokens with the highest global attention of
  vision layer `register_layer` (-2, LLaVA's feature layer; the Qwen2.5-VL reference uses the last
  layer, -1, with object_layer 16);
- kept in original order; positions compacted on LLaVA, original M-RoPE ids on Qwen-VL (as the
  Qwen reference). The reference divides its budget by the images in a call; here every
  sample has its own budget [ours]. The Qwen reference subtracts 1 from the register scores of
  anchors and buffers (which can pick a token twice); here they are excluded [ours].
"""

from __future__ import annotations

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, require_one_image_per_sample


def anchors_and_buffers(object_score: torch.Tensor, anchors: int, cols: int) -> torch.Tensor:
    """[N] bool: the top-`anchors` tokens of object_score [N] and their raster neighbours."""
    tokens = object_score.shape[0]
    top = torch.sort(object_score, descending=True, stable=True).indices[:anchors]
    near = torch.cat([top, top - 1, top + 1, top - cols, top + cols]).clamp(0, tokens - 1)
    chosen = torch.zeros(tokens, dtype=torch.bool, device=object_score.device)
    chosen[near] = True
    return chosen


@register
class HiPrune(TokenPruner):
    name = "hiprune"
    reference_position_ids = "compact"  # [paper] the reference removes the tokens before the LLM

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        alpha: float = 0.1,
        object_layer: int = 9,
        register_layer: int = -2,
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"hiprune: alpha must be in [0, 1] (the anchors' and buffers' share), got {alpha!r}.")
        if isinstance(object_layer, bool) or not isinstance(object_layer, int) or object_layer < 1:
            raise ValueError(
                f"hiprune: object_layer counts vision layers from 1 (9 of 24 on CLIP-L), got {object_layer!r}."
            )
        self.alpha = float(alpha)
        self.object_layer = object_layer
        self.register_layer = int(register_layer)

    def vision_probe_layers(self) -> set[int]:
        return {self.object_layer - 1, self.register_layer}

    def vision_probe_layers_in(self, depth: int) -> set[int]:
        if self.object_layer > depth:
            raise ValueError(
                f"hiprune: object_layer={self.object_layer} is past the vision tower's {depth} layers "
                f"(it counts from 1). Choose object_layer in 1..{depth}."
            )
        return self.vision_probe_layers()

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        grids = require_one_image_per_sample("hiprune", ctx)
        counts = self.budget.count(ctx.visual_counts())
        object_score = ctx.vision_attention_received(self.object_layer - 1).mean(1)  # [B, S]
        register_score = ctx.vision_attention_received(self.register_layer).mean(1)  # [B, S]
        keep = torch.zeros_like(ctx.visual)
        for b, total in enumerate(counts.tolist()):
            slots = ctx.visual[b].nonzero()[:, 0]  # this image's tokens, raster order
            if total == 0:
                continue
            cols = grids[b][1]
            chosen = anchors_and_buffers(object_score[b, slots], round(total * self.alpha / 5), cols)
            registers = total - int(chosen.sum())
            if registers < 0:
                raise ValueError(
                    f"hiprune: the {int(chosen.sum())} anchor and buffer tokens exceed the budget of {total} "
                    f"tokens (alpha={self.alpha}). Choose a smaller alpha or a larger budget."
                )
            rest = register_score[b, slots].masked_fill(chosen, -torch.inf)
            chosen[torch.sort(rest, descending=True, stable=True).indices[:registers]] = True
            keep[b, slots[chosen]] = True
        return keep
