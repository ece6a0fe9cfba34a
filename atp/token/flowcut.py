"""`flowcut` (Tong et al., NeurIPS 2025, "FlowCut: Rethinking Redundancy via Information Flow for
Efficient Vision-Language Models"; code TungChintao/FlowCut): progressive cuts inside the vision
tower, scored by the information that flows through the [CLS] token.

After every tower layer i before the last cut (in our terms: before layer k = i + 1, for
k = 1..last, last = the last layer whose output the projector reads, 22 of 24 on CLIP-L; on a
tower whose projector reads layer 0's output, last = 1: one cut on those very features [ours]), for
each image still holding more than its target of patches, with A the post-softmax attention and
V the value vectors of layer i (current tokens only):

    relation  = mean_heads A[cls, p]                                   (the [CLS] row)
    semantic  = mean_heads softmax_j(V[cls] . V[j])[p]                 (no scaling; j over all tokens)
    score[p]  = (relation / sum_p relation + semantic / sum_p semantic) * || mean_heads V[p] ||_1
    flow[p]   = score[p] at the image's first scored layer, else 0.5 * flow[p] + 0.5 * score[p]

and when rpl = last - k is even it cuts: with n patches present, target t,

    entropy ratio e = H(relation / sum relation) / log n          (0 log 0 = 0 [ours])
    prune = round((n - t) / sqrt(rpl) * (1 - e^2))   if rpl > 0, else n
    keep the max(n - prune, t) patches of highest flow, in their original order.

The [CLS] always stays (it carries the scores). t = keep_tokens minus the prefix tokens the LLM
also receives (none on LLaVA-1.5, which drops the [CLS]). Per image by default [ours]; the
released code takes the largest `prune` of the batch for every image (`share_count=True`).
"""

from __future__ import annotations

import math

import torch

from atp.models.adapter import TowerLayout
from atp.runtime.pruner import TokenPruner, TowerContext, register
from atp.token.selection import TokenBudget, top_k_per_sample

FLOW_DECAY = 0.5  # [code] flow = 0.5 * flow + 0.5 * score


def adaptive_prune_count(relation: torch.Tensor, remaining: int, target: int) -> int:
    """FlowCut's entropy-driven cut size for one image: relation [n] [CLS] attention of its n patches."""
    n = relation.shape[0]
    prob = relation.double() / relation.double().sum()
    entropy = -torch.special.xlogy(prob, prob).sum()  # 0 log 0 = 0 [ours]; the released code gives NaN
    ratio = entropy / math.log(n)
    return int(torch.round((n - target) / remaining**0.5 * (1 - ratio**2)))


@register
class FlowCut(TokenPruner):
    name = "flowcut"
    reference_position_ids = "compact"  # [code] LLaVA-1.5 concatenates the surviving features

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        last_layer: int | None = None,
        share_count: bool = False,
        position_ids: str = "reference",
    ) -> None:
        super().__init__((), position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if last_layer is not None and (
            isinstance(last_layer, bool) or not isinstance(last_layer, int) or last_layer < 1
        ):
            raise ValueError(
                f"flowcut: last_layer must be a vision layer >= 1 (or None: the default), got {last_layer!r}."
            )
        self.last_layer = last_layer
        self.share_count = bool(share_count)

    def _last(self, tower: TowerLayout) -> int:
        """The layer before which the last cut runs: by default the layer whose output the projector
        reads ([code]); before layer 1 when that is layer 0 (no earlier layer's attention to read) [ours]."""
        return max(tower.feature_layers - 1, 1) if self.last_layer is None else self.last_layer

    def vision_prune_layers(self, tower: TowerLayout) -> tuple[int, ...]:
        if tower.prefix < 1:
            raise ValueError(
                "flowcut scores tokens by the vision tower's [CLS] attention, but this tower has no [CLS] token. "
                "Use a method that does not need one with this model."
            )
        return tuple(range(1, self._last(tower) + 1))

    def prune_vision(self, ctx: TowerContext) -> torch.Tensor:
        tower = ctx.tower
        images = ctx.hidden.shape[0]
        llm_prefix = tower.prefix - tower.image_offset  # prefix tokens the LLM receives as image tokens
        image_tokens = torch.full((images,), tower.image_tokens, device=ctx.hidden.device)
        target = self.budget.count(image_tokens) - llm_prefix  # patches each image ends with
        if bool((target < 1).any()):
            raise ValueError(f"flowcut: the budget leaves no patch token besides the {llm_prefix} prefix tokens.")
        patches = ctx.patch_counts()
        active = patches > target
        keep = ctx.valid.clone()
        if not bool(active.any()):
            return keep
        values = ctx.values().double()  # [I, H, T, hd]
        relation = ctx.attention(rows=1)[:, :, 0].double().mean(1)  # [I, T] the [CLS] row ([CLS] sits in slot 0)
        logits = (values[:, :, :1] @ values.transpose(2, 3))[:, :, 0]  # [I, H, T]
        logits = logits.masked_fill(~ctx.valid[:, None], float("-inf"))
        semantic = torch.softmax(logits, dim=-1).mean(1)  # [I, T]
        density = values.mean(1).abs().sum(-1)  # [I, T] L1 norm of the head-averaged value
        relation_p = relation.masked_fill(~ctx.prunable, 0.0)
        semantic_p = semantic.masked_fill(~ctx.prunable, 0.0)
        score = (relation_p / relation_p.sum(1, keepdim=True) + semantic_p / semantic_p.sum(1, keepdim=True)) * density

        device = score.device
        flow_by_index = ctx.scratch.setdefault(  # by original tower index, so it survives the gathers
            "flowcut_flow", torch.zeros(images, tower.tokens, dtype=torch.float64, device=device)
        )
        seen = ctx.scratch.setdefault("flowcut_seen", torch.zeros(images, dtype=torch.bool, device=device))
        index = ctx.index.clamp_min(0)
        previous = torch.gather(flow_by_index, 1, index)
        flow = torch.where(~seen[:, None], score, FLOW_DECAY * previous + (1 - FLOW_DECAY) * score)
        flow = torch.where(active[:, None] & ctx.prunable, flow, previous)
        flow_by_index.scatter_(1, index, flow)  # padding slots write the [CLS] entry's own value back
        seen |= active

        remaining = self._last(tower) - ctx.layer
        if remaining % 2:
            return keep
        if remaining > 0:
            counts = [
                adaptive_prune_count(relation[b][ctx.prunable[b]], remaining, int(target[b])) if active[b] else 0
                for b in range(images)
            ]
            if self.share_count:  # [code] one cut size for the whole batch: the largest
                counts = [max(counts)] * images
            prune = torch.tensor(counts, device=patches.device)
        else:
            prune = patches
        kept = torch.where(active, torch.maximum(patches - prune, target), patches)
        chosen = top_k_per_sample(flow, ctx.prunable, kept)
        return chosen | ~ctx.prunable
