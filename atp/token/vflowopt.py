"""`vflowopt` (Yang et al., ICCV 2025, "VFlowOpt"): attention + patch-entropy importance, progressive
pruning with recycling, and a schedule fitted by visual-information-flow optimisation.

Importance map, per tower input (image), from vision layer `vision_layer`'s attention A (mean over heads)
between the image's patch tokens, and the entropy E of each patch's pixels:

    received[j] = mean_i A[i, j]                    global = {i : received[i] > t * mean(received)}
    map[j]      = mean_{i in global} A[i, j] + alpha * softmax_j(E[j])

E[j]: Shannon entropy (bits) of the 256-bin histogram of the patch's grey levels, grey = round(sum_c
0.3333 * q_c) with q_c = the channel value * 255 truncated to an integer and wrapped to 0..255 (a uint8 cast).
Stages, before the decoder layers `layers` (the first is 0, before the LLM): of the n visual tokens a sample
still has, the round(n * (1 - keep_ratios[s])) with the lowest map value are deleted (or n - keep_tokens[s]).
Recycling (stage 0, `merge_grid=a`): the int(N / a^2) next-lowest tokens are deleted as well; the deleted
tokens are grouped by cell (image, crop, floor(row / a), floor(col / a)), and each group becomes one token:
the map-weighted mean of its hidden states, placed in the slot of its highest-map member.
The map is computed once per prefill; every stage ranks the tokens still present by it.
`atp.calibration.vflowopt` fits (keep_ratios, t, merge_grid, alpha) to a budget; `recipe=` loads the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atp.runtime.pruner import MergeDecision, PruneContext, TokenPruner, register
from atp.token.selection import check_keep_ratio, top_k_per_sample

# Published settings of the official code (LLaVA-OneVision-7B; stages before the LLM and before LLM layers
# 9 and 18), named by the average share of visual tokens kept: (t, alpha, merge_grid, keep_ratios).
SETTINGS = {
    "50%": (28.683047941520474, 0.0, 11.756787150848968, (0.7233201448753168, 0.748747637472693, 0.487)),
    "25%": (34.759552803070484, 0.0, 15.580797034937687, (0.2651026358526424, 0.9833433139039235, 0.8773258179532721)),
    "10%": (39.26492840997221, 0.0, 17.386981849158786, (0.11661529508161146, 1.0, 0.6011)),
}
GREY_WEIGHT = 0.3333  # each channel's weight in the grey level


def patch_entropy(pixels: torch.Tensor) -> torch.Tensor:
    """[...] entropy in bits of the grey-level histogram of each token's pixels.
    pixels: [..., P, C, ph, pw] tower input values of the token's P patches (one histogram over all)."""
    levels = torch.remainder(torch.trunc(pixels.float() * 255), 256)  # a uint8 cast: truncate, wrap to 0..255
    grey = torch.round((levels * GREY_WEIGHT).sum(-3)).long().flatten(-3)  # [..., P * ph * pw]
    hist = torch.zeros(*grey.shape[:-1], 256, device=grey.device).scatter_add_(-1, grey, torch.ones_like(grey).float())
    prob = hist / hist.sum(-1, keepdim=True)
    return -(prob * torch.log2(prob + 1e-10)).sum(-1)


def importance_map(
    attention: torch.Tensor, visual: torch.Tensor, item: torch.Tensor, entropy: torch.Tensor, t: float, alpha: float
) -> torch.Tensor:
    """[B, S0] VFlowOpt's map at original positions (0 off visual tokens), per tower input.

    attention: [B, H, S0, S0] vision attention between visual tokens of one tower input (`ctx.vision_attention`);
    visual: [B, S0] bool; item: [B, S0] long number of each token's tower input (image, crop); entropy: [B, S0].
    """
    mean_heads = attention.float().mean(1)  # [B, S0, S0]
    score = torch.zeros(visual.shape, device=attention.device)
    for b in range(visual.shape[0]):
        for image in item[b][visual[b]].unique():
            tokens = (visual[b] & (item[b] == image)).nonzero()[:, 0]
            block = mean_heads[b][tokens][:, tokens]  # [n, n] queries x keys
            received = block.mean(0)
            chosen = received > t * received.mean()
            context = block[chosen].mean(0) if bool(chosen.any()) else received  # no global token: all queries
            score[b, tokens] = context + alpha * torch.softmax(entropy[b, tokens].float(), 0)
    return score


def load_recipe(path: str | Path) -> dict:
    """The settings of a JSON written by the search job: layers, keep_ratios, t, alpha, merge_grid, vision_layer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vflowopt: recipe file {path} does not exist; fit one with train.py job=vflowopt.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"vflowopt: recipe file {path} is not valid JSON ({error}); refit it.") from error
    return checked_recipe(content.get("recipe") if isinstance(content, dict) else None, str(path))


RECIPE_KEYS = ("layers", "keep_ratios", "t", "alpha", "merge_grid", "vision_layer")


def checked_recipe(recipe, source: str = "the recipe") -> dict:
    """The recipe mapping with every key the pruner needs (RECIPE_KEYS), or a clear error."""
    if not hasattr(recipe, "keys") or not set(RECIPE_KEYS) <= set(recipe.keys()):
        raise ValueError(
            f"vflowopt: {source} holds no recipe with {list(RECIPE_KEYS)}; refit it (train.py job=vflowopt)."
        )
    return {key: recipe[key] for key in RECIPE_KEYS}


@register
class VFlowOpt(TokenPruner):
    """layers: stages (0 first); keep_ratios: share of the present visual tokens each stage keeps (or
    keep_tokens: cumulative counts); t, alpha, merge_grid: see the module docstring; setting: a published
    setting ("50%", "25%", "10%") for t, alpha, merge_grid and keep_ratios; recipe: a fitted JSON."""

    name = "vflowopt"
    reference_position_ids = "compact"  # [ours] the official stage 0 shortens the sequence (see docs)
    needs_pixels = True

    def __init__(
        self,
        layers: list[int] = (0, 9, 18),
        keep_ratios: list[float] | None = None,
        keep_tokens: list[int] | None = None,
        t: float | None = None,
        alpha: float | None = None,
        merge_grid: float | None = None,
        setting: str | None = "10%",
        recipe: str | dict | None = None,
        vision_layer: int = -2,
        position_ids: str = "reference",
    ) -> None:
        fitted = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
        if fitted is not None:
            layers, keep_ratios, t, alpha, merge_grid, vision_layer = checked_recipe(fitted).values()
            keep_tokens = None
        elif setting is not None:
            if setting not in SETTINGS:
                raise ValueError(f"vflowopt: setting must be one of {sorted(SETTINGS)} or None, got {setting!r}.")
            published = dict(zip(("t", "alpha", "merge_grid", "keep_ratios"), SETTINGS[setting]))
            t = published["t"] if t is None else t
            alpha = published["alpha"] if alpha is None else alpha
            merge_grid = published["merge_grid"] if merge_grid is None else merge_grid
            if keep_ratios is None and keep_tokens is None:
                keep_ratios = published["keep_ratios"]
        super().__init__([int(layer) for layer in layers], position_ids)
        if self.layers[0] != 0:
            raise ValueError(
                f"vflowopt: the first stage must be layer 0 (before the LLM), got layers {list(self.layers)}."
            )
        if (keep_ratios is None) == (keep_tokens is None):
            raise ValueError(
                "vflowopt: give keep_ratios (a share per stage) or keep_tokens (counts per stage), one of them."
            )
        budgets = list(keep_ratios if keep_tokens is None else keep_tokens)
        if len(budgets) != len(self.layers):
            raise ValueError(f"vflowopt: {len(budgets)} budgets for the {len(self.layers)} stages {list(self.layers)}.")
        if keep_tokens is None:
            budgets = [check_keep_ratio(self.name, r) for r in budgets]
        elif any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in budgets) or budgets != sorted(
            budgets, reverse=True
        ):
            raise ValueError(f"vflowopt: keep_tokens must be positive, non-increasing integers, got {budgets}.")
        if t is None or alpha is None:
            raise ValueError("vflowopt: give t and alpha (or a published setting).")
        if merge_grid is not None and not float(merge_grid) >= 1.0:
            raise ValueError(
                f"vflowopt: merge_grid (the recycling cell side) must be >= 1 or None, got {merge_grid!r}."
            )
        self.by_count = keep_tokens is not None
        self.budgets = dict(zip(self.layers, budgets))
        self.t, self.alpha = float(t), float(alpha)
        self.merge_grid = None if merge_grid is None else float(merge_grid)
        self.vision_layer = int(vision_layer)

    def vision_probe_layers(self) -> set[int]:
        return {self.vision_layer}

    def importance(self, ctx: PruneContext) -> torch.Tensor:
        """[B, S] the map of the tokens in the current slots."""
        entropy = patch_entropy(ctx.patch_pixels())  # [B, S0]
        attention = ctx.vision_attention(self.vision_layer)  # [B, H, S0, S0]
        geometry = ctx.input_geometry
        tower_input = geometry.image * (int(geometry.crop.max()) + 1) + geometry.crop  # one number per (image, crop)
        score = importance_map(attention, ctx.input_visual, tower_input, entropy, self.t, self.alpha)
        return torch.gather(score, 1, ctx.origin)

    def prune(self, ctx: PruneContext) -> torch.Tensor | MergeDecision:
        score = self.importance(ctx)
        present = ctx.visual_counts()
        budget = self.budgets[ctx.layer]
        if self.by_count:
            if bool(((present > 0) & (present < budget)).any()):
                raise ValueError(
                    f"vflowopt: keep_tokens={budget} at layer {ctx.layer} is more than the "
                    f"{int(present[present > 0].min())} visual tokens a sample has there; lower keep_tokens."
                )
            keep = torch.where(present > 0, budget, 0).to(present)
        else:
            keep = present - torch.round(present.double() * (1 - budget)).long()  # n - round(n (1 - r)), half to even
        if ctx.layer != 0 or self.merge_grid is None:
            return top_k_per_sample(score, ctx.visual, keep)
        return self._recycle(ctx, score, keep)

    def _recycle(self, ctx: PruneContext, score: torch.Tensor, keep: torch.Tensor) -> MergeDecision:
        """Delete int(N / a^2) more tokens and merge every cell's deleted tokens into its best one."""
        side = self.merge_grid
        extra = torch.floor(ctx.visual_counts().double() / (side * side)).long()
        kept = top_k_per_sample(score, ctx.visual, (keep - extra).clamp_min(0))
        hidden, replaced = ctx.hidden.clone(), torch.zeros_like(kept)
        geometry = ctx.geometry
        for b in range(kept.shape[0]):
            deleted = (ctx.visual[b] & ~kept[b]).nonzero()[:, 0]
            cells = torch.stack(
                [
                    geometry.image[b, deleted],
                    geometry.crop[b, deleted],
                    torch.floor(geometry.row[b, deleted] / side).long(),
                    torch.floor(geometry.col[b, deleted] / side).long(),
                ],
                1,
            )
            _, group = torch.unique(cells, dim=0, return_inverse=True)
            for g in range(int(group.max()) + 1 if len(deleted) else 0):
                members = deleted[group == g]
                weights = score[b, members] / score[b, members].sum()
                host = members[score[b, members].argmax()]
                hidden[b, host] = (weights[:, None] * ctx.hidden[b, members].float()).sum(0).to(hidden.dtype)
                replaced[b, host] = True
        return MergeDecision(keep=kept | replaced, hidden=hidden, replaced=replaced)
