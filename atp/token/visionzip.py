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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, register
from atp.token.selection import TokenBudget, top_k_per_sample

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
        image = ctx.geometry.image
        if any(image[b][ctx.visual[b]].unique().numel() > 1 for b in range(image.shape[0])):
            raise ValueError("visionzip selects and merges per image; prompts with several images are not supported.")
        counts = self.budget.count(ctx.visual_counts())
        score = ctx.vision_cls_attention(self.vision_layer).sum(1)  # [B, S]
        dominant_counts = torch.tensor([split_budget(int(c))[0] for c in counts], device=counts.device)
        keep = top_k_per_sample(score, ctx.visual, dominant_counts)
        keys = ctx.vision_keys(self.vision_layer).mean(1)  # [B, S, hd]
        features = ctx.vision_features()  # [B, S, dv]
        hidden = ctx.hidden.clone()
        replaced = torch.zeros_like(keep)
        order = torch.arange(keep.shape[1], device=keep.device, dtype=torch.float64).expand(keep.shape).clone()
        for b, total in enumerate(counts.tolist()):
            contextual = total - int(dominant_counts[b])
            slots = (ctx.visual[b] & ~keep[b]).nonzero()[:, 0]  # the non-dominant tokens
            if contextual == 0 or len(slots) == 0:
                continue
            targets, merged = contextual_tokens(features[b, slots], keys[b, slots], contextual, self.merge)
            hosts = slots[targets]  # a contextual token lives in its target's slot
            hidden[b, hosts] = ctx.project(merged).to(hidden.dtype)
            replaced[b, hosts] = True
            order[b, hosts] += keep.shape[1]  # after every dominant token, in target order
        keep = keep | replaced
        return MergeDecision(keep=keep, hidden=hidden, replaced=replaced, order=order)
