"""Fit a FitPrune recipe to a FLOPs budget from calibration statistics (Ye et al., 2024).

1. Statistics: one unpruned pass over the calibration batches records, per sample and layer,
   the total masses W_cross[l] = sum_j cross[j] and W_self[l] = sum_j self[j]
   (`atp.token.fitprune.attention_masses`).
2. A trial for `alpha` walks the layers with the pruning applied so far. At layer l each
   sample deletes the tokens in both of its lowest sets: the most tokens, lowest `cross`
   first, whose removal keeps the remaining cross mass >= (1 - alpha) * W_cross[l], and the
   same by `self`. The recipe entry is the mean deleted count over samples, floored. Entries
   stop at the first layer where the projected prefill FLOPs (layers so far at their counts,
   the rest at the current count) reach the budget: the trial "reaches" it.
3. Bisection on the grid alpha = 0, 0.01, ..., 1 finds the smallest alpha that reaches it.

Deviation from the reference code, on purpose: it projects the walk's per-sample counts at
the stop test; here the stop test projects the recipe's own counts (the walk's means,
floored), so the saved recipe provably meets the budget on the calibration set. FLOPs come
from `atp.metrics.accounting` and the model's own config, never constants of one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from atp.metrics.accounting import prefill_flops
from atp.models.adapter import MODEL_INPUT_KEYS
from atp.progress import progress
from atp.runtime import attach
from atp.runtime.pruner import PruneContext, TokenPruner
from atp.token.fitprune import attention_masses

ALPHA_STEPS = 100  # the grid 0, 0.01, ..., 1 (the reference's precision)


def lowest_set(score: torch.Tensor, visual: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the most lowest-scoring visual tokens whose removal keeps the remaining
    mass >= threshold (at least one visual token stays).

    score: [B, S] >= 0, 0 on non-visual slots; visual: [B, S] bool; threshold: [B].
    """
    order = torch.sort(score.masked_fill(~visual, math.inf), dim=1, stable=True).indices
    ascending = torch.gather(score, 1, order)  # non-visual slots sort last (their score is 0)
    remaining = score.sum(1, keepdim=True) - torch.cumsum(ascending, 1)  # after deleting 1, 2, ...
    deletions = torch.arange(1, score.shape[1] + 1, device=score.device)
    allowed = (remaining >= threshold[:, None]) & (deletions < visual.sum(1, keepdim=True))
    count = allowed.sum(1)
    rank = torch.empty_like(order).scatter_(1, order, (deletions - 1).expand_as(order))
    return (rank < count[:, None]) & visual


class _MassWalk(TokenPruner):
    """Before every layer l + 1: score with layer l's attention; record the masses; with an
    alpha, delete each sample's intersection of its two lowest sets (the fitting walk)."""

    name = "fitprune_walk"

    def __init__(self, num_layers: int) -> None:
        super().__init__(list(range(1, num_layers)))
        self.alpha: float | None = None
        self.totals: torch.Tensor | None = None  # [B, L - 1, 2] unpruned (W_cross, W_self)
        self.masses: dict[int, torch.Tensor] = {}  # layer -> [B, 2]
        self.deleted: dict[int, torch.Tensor] = {}  # layer -> [B]

    def probe_layers(self) -> set[int]:
        return {layer - 1 for layer in self.layers}

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        layer = ctx.layer - 1
        cross, self_ = attention_masses(ctx, layer)
        self.masses[layer] = torch.stack([cross.sum(1), self_.sum(1)], 1)
        if self.alpha is None:
            return torch.ones_like(ctx.visual)
        keep_fraction = 1.0 - self.alpha
        delete = lowest_set(cross, ctx.visual, keep_fraction * self.totals[:, layer, 0])
        delete &= lowest_set(self_, ctx.visual, keep_fraction * self.totals[:, layer, 1])
        self.deleted[layer] = delete.sum(1).cpu()
        return ~delete


@dataclass
class Trial:
    """One alpha: its recipe (truncated where the budget is reached) and what it costs."""

    alpha: float
    reached: bool
    recipe: dict[int, int]
    flops_ratio: float  # the recipe's prefill FLOPs / unpruned, on the calibration set
    mean_deleted: list[float] = field(default_factory=list)  # the walk's mean count per layer


class FitPruneFitter:
    """model: an HF LLaVA (no pruner attached); batches: model-input dicts (input_ids,
    attention_mask, pixel_values) of prompts without answers; flops_budget: the fraction of
    the unpruned LLM prefill FLOPs the pruned model may spend, in (0, 1)."""

    def __init__(self, model, batches: list[dict], flops_budget: float) -> None:
        if not isinstance(flops_budget, (int, float)) or not 0.0 < float(flops_budget) < 1.0:
            raise ValueError(
                f"fitprune: flops_budget must be in (0, 1) (the fraction of the unpruned prefill FLOPs to "
                f"keep, e.g. 0.5), got {flops_budget!r}."
            )
        if not batches or sum(int(b["input_ids"].shape[0]) for b in batches) == 0:
            raise ValueError(
                "fitprune: the calibration set is empty; give at least one sample (fit.calibration_samples)."
            )
        self.model, self.batches, self.budget = model, batches, float(flops_budget)
        self.device = next(model.parameters()).device
        self.config = model.config.text_config
        self.num_layers = int(self.config.num_hidden_layers)
        self.walk = _MassWalk(self.num_layers)
        self.totals: list[torch.Tensor] = []
        text, visual = [], []
        for batch, masses, stats in self._passes(alpha=None, description="fitprune: statistics"):
            self.totals.append(torch.stack([masses[layer] for layer in range(self.num_layers - 1)], 1))
            text.append(stats.input_tokens - stats.num_visual)
            visual.append(stats.num_visual)
        self.text_tokens, self.num_visual = torch.cat(text), torch.cat(visual)
        if int(self.num_visual.min()) == 0:
            raise ValueError(
                "fitprune: every calibration sample needs an image (a prompt without image tokens was given)."
            )

    @torch.inference_mode()
    def _passes(self, alpha: float | None, description: str):
        self.walk.alpha = alpha
        attach.apply(self.model, self.walk, mode="drop")
        try:
            for index, batch in enumerate(progress(self.batches, description, unit="batch")):
                self.walk.masses, self.walk.deleted = {}, {}
                self.walk.totals = self.totals[index] if alpha is not None else None
                self.model(**{k: batch[k].to(self.device) for k in MODEL_INPUT_KEYS if k in batch})
                yield batch, self.walk.masses, attach.stats(self.model)
        finally:
            attach.remove(self.model)

    def visual_tokens_per_layer(self, recipe: dict[int, int]) -> torch.Tensor:
        """[samples, L] visual tokens each layer processes under `recipe` (deleted after layer l)."""
        deleted = torch.zeros(self.num_layers, dtype=torch.long)
        for layer, count in recipe.items():
            if layer + 1 < self.num_layers:
                deleted[layer + 1 :] += count
        return (self.num_visual[:, None] - deleted[None]).clamp_min(0)

    def flops_ratio(self, recipe: dict[int, int]) -> float:
        """Analytic prefill FLOPs of `recipe` / unpruned, summed over the calibration set."""
        visual = self.visual_tokens_per_layer(recipe)
        tokens = self.text_tokens[:, None] + visual
        unpruned = (self.text_tokens + self.num_visual)[:, None].expand_as(tokens)
        return float(prefill_flops(self.config, tokens).sum() / prefill_flops(self.config, unpruned).sum())

    def trial(self, alpha: float) -> Trial:
        """Walk the calibration set at `alpha`; the recipe stops where the budget is reached."""
        deleted = [torch.cat(list(counts)) for counts in zip(*(self._deleted_in_pass(alpha)))]
        mean_deleted = [float(d.double().mean()) for d in deleted]
        full = {layer: int(math.floor(mean + 1e-9)) for layer, mean in enumerate(mean_deleted)}
        for stop in range(self.num_layers):
            recipe = {layer: count for layer, count in full.items() if layer < stop and count > 0}
            ratio = self.flops_ratio(recipe)
            if ratio <= self.budget:
                return Trial(alpha, True, recipe, ratio, mean_deleted)
        return Trial(alpha, False, {k: v for k, v in full.items() if v > 0}, ratio, mean_deleted)

    def _deleted_in_pass(self, alpha: float):
        for _batch, _masses, _stats in self._passes(alpha, description=f"fitprune: alpha = {alpha:.2f}"):
            yield [self.walk.deleted[layer] for layer in range(self.num_layers - 1)]

    def fit(self) -> tuple[Trial, list[Trial]]:
        """(the trial at the smallest grid alpha that reaches the budget, every trial run)."""
        trials = {}

        def reached(step: int) -> bool:
            trials[step] = self.trial(step / ALPHA_STEPS)
            return trials[step].reached

        if not reached(ALPHA_STEPS):
            raise ValueError(
                f"fitprune: a FLOPs budget of {self.budget:.3f} cannot be reached by deleting visual tokens "
                f"(alpha = 1 gives {trials[ALPHA_STEPS].flops_ratio:.3f} of the unpruned FLOPs); raise the budget."
            )
        low, high = 0, ALPHA_STEPS
        if reached(low):
            return trials[low], list(trials.values())
        while high - low > 1:  # invariant: low does not reach the budget, high does
            middle = (low + high) // 2
            if reached(middle):
                high = middle
            else:
                low = middle
        return trials[high], [trials[k] for k in sorted(trials)]
