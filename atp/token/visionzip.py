"""`visionzip` (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary"): keep the
dominant visual tokens and merge the rest into a few contextual tokens, before the LLM.

Dominant: the [CLS] attention of vision layer -2 (`[:, :, 0, 1:]`), summed over heads;
the top `dominant` tokens, in their original order.
Contextual: the remaining tokens, in original order, described by their keys of the same
layer averaged over heads and L2-normalised. `contextual` targets are taken at a uniform
stride (`step = max(1, R // contextual)`, indices 0, step, 2*step, ...); every other
remaining token joins its most similar target (cosine, first on ties).
The merge happens on the image features at the projector input, as in the reference
(which merges the vision tower's output before LLaVA's projector); the merged features
are then projected.

Merged token, `merge="reference"`: target + mean of the tokens that joined it (the
released code: `contextual_tokens = target_hidden + aggregated_hidden`; a target nobody
joined stays itself). `merge="mean"`: the mean of the group, target included (the
paper's wording). The LLM sees the dominant tokens first, then the contextual tokens in
target order, with compact positions, as in the reference.
On M-RoPE families (Qwen-VL) the default (`position_ids="reference"`) keeps original ids [ours].
Multi-tile images (InternVL): one selection and one merge over all the image's tiles together,
each token scored by its own tile's [CLS] (summed over the 2x2 patches it holds) and described by
the mean key of those patches [ours]; the released code runs per tower input.

Budgets: `keep_tokens` (or `keep_ratio` of the visual tokens) split as the paper's
54 + 10 = 64, 108 + 20 = 128 and 162 + 30 = 192, i.e. dominant = round(t * 54 / 64).

Several views (LLaVA-NeXT's base view and anyres crops; several images): as the reference's
LLaVA-NeXT code, every view selects and merges on its own, by its own [CLS]; a sample's budget is
apportioned over its views by their tokens [ours: the reference gives every crop the same count],
then split into dominant and contextual per view. Order, as the reference packs NeXT: per image
the base view's dominant then contextual tokens, then the crops' dominant tokens in packed order,
then the crops' contextual tokens crop by crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, apportion, view_groups

DOMINANT_SHARE = 54 / 64  # the paper's split of every budget (54 + 10, 108 + 20, 162 + 30)
MERGE_RULES = ("reference", "mean")


def split_budget(tokens: int) -> tuple[int, int]:
    """(dominant, contextual) counts for a budget of `tokens` kept tokens."""
    dominant = min(tokens, int(tokens * DOMINANT_SHARE + 0.5))
    return dominant, tokens - dominant


def contextual_tokens(features: torch.Tensor, keys: torch.Tensor, contextual: int, merge: str):
    """VisionZip's contextual merge for the non-dominant tokens of one image.

    features: [R, dv] their features and keys: [R, k] their descriptors (head-averaged keys),
    both in original order. Returns (targets [C] long indices into R, merged [C, dv]).
    """
    remaining = keys.shape[0]
    step = max(1, remaining // contextual)
    targets = torch.arange(0, remaining, step, device=keys.device)[:contextual]
    unit = F.normalize(keys.float(), dim=-1)
    group = (unit @ unit[targets].T).argmax(1)  # most similar target, first on ties
    group[targets] = torch.arange(len(targets), device=keys.device)
    members = torch.zeros(len(targets), remaining, device=features.device)
    members[group, torch.arange(remaining, device=features.device)] = 1.0
    if merge == "reference":  # target + mean of the tokens that joined it
        members[torch.arange(len(targets)), targets] = 0.0
        joined = members @ features.float() / members.sum(1, keepdim=True).clamp_min(1)
        return targets, (features[targets].float() + joined).to(features.dtype)
    return targets, (members @ features.float() / members.sum(1, keepdim=True)).to(features.dtype)


@register
class VisionZip(TokenPruner):
    name = "visionzip"
    reference_position_ids = "compact"  # [paper] the reference code compacts positions
    needs_vision_cls = True  # scores by the tower's [CLS] row
    needs_vision_features = True

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        vision_layer: int = -2,
        merge: str = "reference",
        position_ids: str = "reference",
    ) -> None:
        super().__init__([0], position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if merge not in MERGE_RULES:
            raise ValueError(f"visionzip: merge must be one of {MERGE_RULES}, got {merge!r}.")
        self.vision_layer = int(vision_layer)
        self.merge = merge

    def vision_probe_layers(self) -> set[int]:
        return {self.vision_layer}

    def prune(self, ctx: PruneContext) -> MergeDecision:
        geometry = ctx.geometry
        view = geometry.tower_view()
        counts = self.budget.count(ctx.visual_counts())
        score = ctx.vision_cls_attention(self.vision_layer).sum(1)  # [B, S]
        keys = ctx.vision_keys(self.vision_layer).mean(1)  # [B, S, hd]
        features = ctx.vision_features()  # [B, S, dv]
        hidden = ctx.hidden.clone()
        keep = torch.zeros_like(ctx.visual)
        replaced = torch.zeros_like(keep)
        for b, total in enumerate(counts.tolist()):
            groups = view_groups(view[b], ctx.visual[b])
            for slots, budget in zip(groups, apportion([len(g) for g in groups], total)):
                dominant, contextual = split_budget(budget)
                ranked = torch.sort(score[b, slots].float(), descending=True, stable=True).indices
                keep[b, slots[ranked[:dominant]]] = True
                rest = slots[torch.sort(ranked[dominant:]).values]  # the non-dominant tokens, in order
                if contextual == 0 or len(rest) == 0:
                    continue
                targets, merged = contextual_tokens(features[b, rest], keys[b, rest], contextual, self.merge)
                hosts = rest[targets]  # a contextual token lives in its target's slot
                hidden[b, hosts] = ctx.project(merged).to(hidden.dtype)
                replaced[b, hosts] = True
        keep = keep | replaced
        return MergeDecision(keep=keep, hidden=hidden, replaced=replaced, order=packing_order(geometry, replaced))


def packing_order(geometry, contextual: torch.Tensor) -> torch.Tensor:
    """[B, S] float64 sort key of the kept visual tokens, the reference's packing: per image, the base
    view (crop 0) then the other crops; in each, dominant tokens in slot order, then contextual
    tokens (contextual [B, S] bool), in the other crops crop by crop; slot order within. Without
    separate views (`geometry.view` None): per image, dominant then contextual tokens."""
    slot = torch.arange(contextual.shape[1], device=contextual.device, dtype=torch.float64).expand(contextual.shape)
    if geometry.view is None:  # one tower view per image (LLaVA-1.5; InternVL's tiles select together)
        crop = torch.zeros_like(geometry.crop, dtype=torch.float64)
    else:
        crop = geometry.crop.clamp_min(0).double()
    section = (crop > 0).double()
    crops = float(crop.max()) + 1 if crop.numel() else 1.0
    group = ((geometry.image.clamp_min(0).double() * 2 + section) * 2 + contextual.double()) * crops
    return (group + torch.where(contextual, crop, 0.0)) * contextual.shape[1] + slot
