"""`zero_tprune` (Wang, Dedhia and Jha, CVPR 2024, "Zero-TPrune: Zero-Shot Token Pruning through
Leveraging of the Attention Graph in Pre-Trained Transformers", arXiv 2305.17328): cuts inside the
vision tower, first by importance on the attention graph, then by similarity. No official code is
published; the rule follows the paper, and what it leaves open is marked [ours] in docs/methods.md.

Before each tower layer k in `layers` (default [ours]: a quarter, a half and three quarters of the
layers whose output the projector reads: 5, 11, 17 on CLIP-L; each at least 1, so a tower whose
projector reads layer 0's output gets one cut, before layer 1, on those features), with A the post-softmax attention
and K the keys of layer k - 1 (current tokens only), each image goes from n to g patches, g from
a geometric schedule ending at the budget [ours]: g_i = round(P * (t / P)^(i / m)) for cut i of m.
d = n - g tokens go, s = min(round(similarity_share * d), g) of them in the S-stage [ours]:

  I-stage [paper]: Weighted Page Rank per head h: s_h = 1/N on the N tokens, then
      s_h <- A_h^T s_h (s_h[j] = sum_i A_h[i, j] s_h[i]) for `wpr_iterations` rounds;
      importance[j] = sqrt(mean_h s_h[j]^2) (Emphasizing Informative Region: root mean square
      over heads); optional Variance-based Head Filter: heads whose variance of N * s_h lies
      outside `head_filter` are left out (all heads if none is left) [ours: the scale].
      The d - s patches of lowest importance go (ties: the later patch goes).
  S-stage: the remaining patches in descending importance (ties: earlier slot first); the first
      ceil(n' / 2) are targets, the rest sources [ours: importance-ordered halves]; each source's
      similarity is its highest cosine similarity, on head-averaged keys, to a target [ours: keys,
      as in ToMe]; the s sources most similar to a target go (ties: the first in importance order goes) —
      pruned, not merged [paper: "similarity-based pruning"].

The [CLS] token always stays. Iterations default to the paper's ranges (30-50 in the first three
layers, 5-10 in the middle, 1 in the last three): 30 / 5 / 1 by the position of layer k - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atp.models.adapter import TowerLayout
from atp.runtime.pruner import TokenPruner, TowerContext, register
from atp.token.selection import TokenBudget, top_k_per_sample


def wpr_importance(
    attention: torch.Tensor, valid: torch.Tensor, iterations: int, head_filter: tuple[float, float] | None
) -> torch.Tensor:
    """[I, T] Weighted Page Rank importance, root mean square over heads.

    attention: [I, H, T, T] post-softmax (0 on padding); valid: [I, T] bool real tokens.
    """
    attention = attention.double()
    count = valid.sum(1).double()  # [I] tokens N per image
    score = valid.double()[:, None, :] / count[:, None, None]  # [I, H, T] start: 1/N each
    score = score.expand(-1, attention.shape[1], -1)
    for _ in range(iterations):
        score = (attention.transpose(2, 3) @ score[..., None])[..., 0]  # s_j <- sum_i A_ij s_i
    heads = torch.ones(score.shape[:2], dtype=torch.bool, device=score.device)
    if head_filter is not None:
        low, high = head_filter
        scaled = score * count[:, None, None]  # mean 1 over the image's tokens
        mean = scaled.sum(-1, keepdim=True) / count[:, None, None]
        variance = (((scaled - mean) ** 2) * valid[:, None]).sum(-1) / (count[:, None] - 1).clamp_min(1)
        heads = (variance >= low) & (variance <= high)
        heads = heads | ~heads.any(1, keepdim=True)  # no head passes: use them all [ours]
    squares = (score**2 * heads[..., None]).sum(1) / heads.sum(1, keepdim=True)
    return squares.sqrt()


def default_iterations(layer: int, depth: int) -> int:
    """WPR rounds for the attention of tower layer `layer`: 30 in the first three, 1 in the last three, else 5."""
    if layer < 3:
        return 30
    return 1 if layer >= depth - 3 else 5


@register
class ZeroTPrune(TokenPruner):
    name = "zero_tprune"
    reference_position_ids = "compact"  # [ours] like every method whose tokens enter LLaVA shortened

    def __init__(
        self,
        keep_tokens: int | None = 64,
        keep_ratio: float | None = None,
        layers: list[int] | None = None,
        similarity_share: float = 0.5,
        wpr_iterations: int | None = None,
        head_filter: list[float] | None = None,
        position_ids: str = "reference",
    ) -> None:
        super().__init__((), position_ids)
        self.budget = TokenBudget(self.name, keep_ratio=keep_ratio, keep_tokens=keep_tokens)
        if not 0.0 <= float(similarity_share) <= 1.0:
            raise ValueError(f"zero_tprune: similarity_share must be in [0, 1], got {similarity_share!r}.")
        if wpr_iterations is not None and (not isinstance(wpr_iterations, int) or wpr_iterations < 1):
            raise ValueError(f"zero_tprune: wpr_iterations must be a positive integer or None, got {wpr_iterations!r}.")
        if head_filter is not None and (len(head_filter) != 2 or not 0 <= head_filter[0] <= head_filter[1]):
            raise ValueError(
                f"zero_tprune: head_filter must be [low, high] with 0 <= low <= high, got {head_filter!r}."
            )
        self.cut_layers = None if layers is None else [int(layer) for layer in layers]
        self.similarity_share = float(similarity_share)
        self.wpr_iterations = wpr_iterations
        self.head_filter = None if head_filter is None else (float(head_filter[0]), float(head_filter[1]))

    def vision_prune_layers(self, tower: TowerLayout) -> tuple[int, ...]:
        if tower.prefix < 1:
            raise ValueError(
                "zero_tprune keeps the tower's [CLS] token and prunes patches, but this tower has no [CLS] token. "
                "Use a method that does not need one with this model."
            )
        if self.cut_layers is not None:
            if any(layer < 1 for layer in self.cut_layers):
                raise ValueError(
                    f"zero_tprune: cut layers must be >= 1 (they read layer k - 1), got {self.cut_layers}."
                )
            return tuple(self.cut_layers)
        quarters = [tower.feature_layers * share // 4 for share in (1, 2, 3)]
        return tuple(sorted({max(1, layer) for layer in quarters}))

    def _goal(self, ctx: TowerContext, images: int) -> torch.Tensor:
        """[I] patches each image keeps after this cut (the geometric schedule)."""
        tower = ctx.tower
        image_tokens = torch.full((images,), tower.image_tokens, device=ctx.hidden.device)
        target = self.budget.count(image_tokens) - (tower.prefix - tower.image_offset)
        if bool((target < 1).any()):
            raise ValueError("zero_tprune: the budget leaves no patch token besides the prefix tokens.")
        stages = self.vision_prune_layers(tower)
        step = stages.index(ctx.layer) + 1
        fraction = (target.double() / tower.patches) ** (step / len(stages))
        return torch.floor(tower.patches * fraction + 0.5).long().clamp_min(target)

    def prune_vision(self, ctx: TowerContext) -> torch.Tensor:
        images = ctx.hidden.shape[0]
        patches = ctx.patch_counts()
        goal = torch.minimum(self._goal(ctx, images), patches)
        removed = patches - goal
        if not bool((removed > 0).any()):
            return ctx.valid.clone()
        similar = torch.minimum(torch.floor(removed.double() * self.similarity_share + 0.5).long(), goal)
        iterations = self.wpr_iterations or default_iterations(ctx.layer - 1, ctx.tower.depth)
        importance = wpr_importance(ctx.attention(), ctx.valid, iterations, self.head_filter)
        after_importance = top_k_per_sample(importance, ctx.prunable, patches - (removed - similar))
        keys = F.normalize(ctx.keys().double().mean(1), dim=-1)  # [I, T, hd] head-averaged, unit length
        keep = after_importance.clone()
        for b in range(images):
            if int(similar[b]) == 0:
                continue
            slots = after_importance[b].nonzero()[:, 0]
            order = torch.sort(importance[b, slots], descending=True, stable=True).indices
            ranked = slots[order]
            half = (len(ranked) + 1) // 2
            targets, sources = ranked[:half], ranked[half:]
            similarity = (keys[b, sources] @ keys[b, targets].T).max(1).values  # [sources]
            drop = torch.sort(similarity, descending=True, stable=True).indices[: int(similar[b])]
            keep[b, sources[drop]] = False
        return keep | ~ctx.prunable
