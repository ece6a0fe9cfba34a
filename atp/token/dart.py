"""`dart` (Wen et al., 2025, "Stop looking for important tokens ... duplication matters more"):
keep the visual tokens least duplicated with a few pivot tokens, before LLM layer K.

Pivots: the `pivot_image_tokens` visual tokens and the `pivot_text_tokens` instruction tokens
with the largest L1 norm of their key in layer K-1 (RoPE applied, all heads concatenated).
Duplication is measured on the hidden states entering layer K after the model's final norm.
The pivots are visited in the order the reference iterates them (a Python `set` of their
positions in the unpadded prompt); each pivot takes the `per_pivot` visual tokens with the
lowest cosine similarity to it among those not yet taken (image pivots excluded). Kept: the
image pivots and every pick. per_pivot = keep_tokens // (image + text pivots) (or
int(N * keep_ratio / pivots), the reference's Qwen2-VL arithmetic): the published "128"
keeps 4 + 8 * 16 = 132 tokens. Kept tokens keep their original positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import check_keep_ratio


@register
class DART(TokenPruner):
    name = "dart"
    reference_position_ids = "original"  # [paper] position_ids = the kept tokens' original indices

    def __init__(
        self,
        layer: int = 2,
        keep_tokens: int | None = 128,
        keep_ratio: float | None = None,
        pivot_image_tokens: int = 4,
        pivot_text_tokens: int = 4,
        position_ids: str = "original",
    ) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"dart: layer K must be an integer >= 1 (pivots use layer K-1's keys), got {layer!r}.")
        for what, count in (("pivot_image_tokens", pivot_image_tokens), ("pivot_text_tokens", pivot_text_tokens)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"dart: {what} must be an integer >= 0, got {count!r}.")
        pivots = pivot_image_tokens + pivot_text_tokens
        if pivots < 1:
            raise ValueError("dart: give at least one pivot (pivot_image_tokens + pivot_text_tokens >= 1).")
        if keep_tokens is not None:
            if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or keep_tokens < pivots:
                raise ValueError(
                    f"dart: keep_tokens must be an integer >= the {pivots} pivots (each pivot picks "
                    f"keep_tokens // {pivots} tokens), got {keep_tokens!r}."
                )
        elif keep_ratio is not None:
            check_keep_ratio(self.name, keep_ratio)
        else:
            raise ValueError("dart: give a budget, keep_tokens (a count) or keep_ratio (a fraction).")
        super().__init__([layer], position_ids)
        self.layer = layer
        self.keep_tokens, self.keep_ratio = keep_tokens, None if keep_tokens is not None else float(keep_ratio)
        self.pivot_image_tokens, self.pivot_text_tokens = pivot_image_tokens, pivot_text_tokens

    def probe_layers(self) -> set[int]:
        return {self.layer - 1}

    def per_pivot(self, num_visual: int) -> int:
        """Tokens each pivot picks for a sample with `num_visual` visual tokens [paper]."""
        pivots = self.pivot_image_tokens + self.pivot_text_tokens
        if self.keep_tokens is not None:
            return self.keep_tokens // pivots
        return int(num_visual * self.keep_ratio / pivots)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        key_norm = ctx.keys(self.layer - 1).abs().sum((1, 3))  # [B, S] L1 over heads and head dims
        normed = ctx.final_norm(ctx.hidden).float()  # [B, S, d]
        unpadded = ctx.real.long().cumsum(1) - 1  # [B, S] position in the unpadded prompt (one stage: slot order)
        keep = torch.zeros_like(ctx.visual)
        for b in range(ctx.visual.shape[0]):
            visual = ctx.visual[b].nonzero()[:, 0]
            if len(visual) == 0:
                continue
            text = ctx.instruction[b].nonzero()[:, 0]
            per = self.per_pivot(len(visual))
            image_pivots = _top(key_norm[b, visual], self.pivot_image_tokens, visual)
            text_pivots = _top(key_norm[b, text], self.pivot_text_tokens, text)
            total = len(image_pivots) + (len(image_pivots) + len(text_pivots)) * per
            if total > len(visual):
                raise ValueError(
                    f"dart: the budget keeps {len(image_pivots)} image pivots + {per} tokens per pivot = {total} "
                    f"tokens, more than the {len(visual)} visual tokens of a sample. Lower keep_tokens or keep_ratio."
                )
            pivots = torch.cat([image_pivots, text_pivots])  # each group by descending key norm
            slot_at = {int(unpadded[b, s]): int(s) for s in pivots}
            free = torch.zeros_like(ctx.visual[b])
            free[visual] = True
            free[image_pivots] = False
            # [paper] the reference visits the pivots in the iteration order of a copy of the Python set
            # built from this list of their positions (CPython's order: it changes which tokens are picked)
            for position in list(set([int(unpadded[b, s]) for s in pivots]).copy()):
                candidates = free.nonzero()[:, 0]
                similarity = F.cosine_similarity(normed[b, slot_at[position]][None], normed[b, candidates], dim=-1)
                picks = candidates[_lowest(similarity, per)]
                keep[b, picks] = True
                free[picks] = False
            keep[b, image_pivots] = True
        return keep


def _top(score: torch.Tensor, count: int, slots: torch.Tensor) -> torch.Tensor:
    """The slots of the `count` highest scores (all if fewer), ties to the earlier slot."""
    order = torch.sort(score, descending=True, stable=True).indices
    return slots[order[:count]]


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest scores, ties to the earlier index."""
    return torch.sort(score, stable=True).indices[:count]
