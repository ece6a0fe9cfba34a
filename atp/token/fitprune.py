"""`fitprune` (Ye et al., 2024, "Fit and Prune"): delete visual tokens by a fitted recipe.

A recipe maps a decoder layer l to the number of visual tokens deleted at l. The score of a
visual token j comes from layer l's own post-softmax attention A, maximised over heads:

    cross[j] = sum_{i in instruction queries} A[i, j] / #instruction queries
    self[j]  = sum_{i in visual queries}      A[i, j] / #visual tokens present

and the recipe[l] tokens with the smallest cross[j] * self[j] are deleted. They served as keys
in layer l's attention and leave the residual stream before layer l + 1. (The reference code
removes them between layer l's attention and its MLP; the MLP is token-wise, so the kept
tokens' outputs are identical here, and the accounting counts the MLP work that really runs.)
Kept tokens keep their original position ids. `atp.calibration.fitprune` fits recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.selection import top_k_per_sample


def attention_masses(ctx: PruneContext, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross, self), each [B, S]: FitPrune's per-token attention masses in decoder layer
    `layer` (head-wise max of the attention), 0 on non-visual slots:

        cross[j] = mean over instruction queries i of max_h A_h[i, j]
        self[j]  = mean over visual queries i of max_h A_h[i, j]
    """
    visual, instruction = ctx.visual.float(), ctx.instruction.float()
    received = ctx.attention_received(layer, torch.stack([instruction, visual], 1), heads="max")
    cross = received[:, 0] / instruction.sum(1, keepdim=True).clamp_min(1.0)
    self_ = received[:, 1] / visual.sum(1, keepdim=True).clamp_min(1.0)
    return cross.masked_fill(~ctx.visual, 0.0), self_.masked_fill(~ctx.visual, 0.0)


def load_recipe(path: str | Path) -> dict[int, int]:
    """The `recipe` of a JSON file written by the fitting job (or a bare {layer: count} JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"fitprune: recipe file {path} does not exist; fit one with train.py experiment=fitprune_shapes."
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"fitprune: recipe file {path} is not valid JSON ({error}); refit it.") from error
    recipe = content.get("recipe", content) if isinstance(content, dict) else None
    if not isinstance(recipe, dict):
        raise ValueError(f"fitprune: {path} holds no recipe mapping (expected {{'recipe': {{layer: count}}}}).")
    return recipe


def _checked_recipe(recipe: dict) -> dict[int, int]:
    deletions = {}
    for layer, count in dict(recipe).items():
        try:
            layer_int, count_int = int(layer), int(count)
        except (TypeError, ValueError):
            raise ValueError(
                f"fitprune: recipe entries must be integer layer -> integer count, got {layer!r}: {count!r}."
            ) from None
        if layer_int < 0 or count_int < 0 or count_int != count:
            raise ValueError(
                f"fitprune: recipe entry {layer!r}: {count!r} must have a layer >= 0 and a whole count >= 0."
            )
        if count_int:
            deletions[layer_int] = count_int
    return dict(sorted(deletions.items()))


@register
class FitPrune(TokenPruner):
    """recipe: {layer: visual tokens to delete at that layer}, or the path of a fitted recipe JSON."""

    name = "fitprune"

    def __init__(self, recipe: dict | str, position_ids: str = "original") -> None:
        deletions = _checked_recipe(load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe)
        if not deletions:
            raise ValueError("fitprune: the recipe deletes no tokens; use pruner 'none' for the unpruned model.")
        super().__init__([layer + 1 for layer in deletions], position_ids)  # removed before layer l + 1
        self.deletions = deletions

    def probe_layers(self) -> set[int]:
        return set(self.deletions)

    def validate(self, num_layers: int) -> None:
        beyond = [layer for layer in self.deletions if layer >= num_layers - 1]
        if beyond:
            raise ValueError(
                f"fitprune: the recipe deletes at layer(s) {beyond}, but the model has {num_layers} decoder "
                f"layers and a deletion at layer l acts from layer l + 1, so recipe layers must be 0.."
                f"{num_layers - 2}. This recipe was fitted for another model; refit it on this one."
            )
        super().validate(num_layers)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        layer = ctx.layer - 1
        count = self.deletions[layer]
        present = ctx.visual_counts()
        if bool((present < count).any()):
            raise ValueError(
                f"fitprune: the recipe deletes {count} visual tokens at layer {layer}, but only "
                f"{int(present.min())} remain there (the recipe deletes more tokens than the image has "
                "after its earlier deletions); refit the recipe for this model and image size."
            )
        cross, self_ = attention_masses(ctx, layer)
        return top_k_per_sample(cross * self_, ctx.visual, present - count) | ~ctx.visual
