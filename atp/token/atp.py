"""`atp`: ATP-LLaVA's learned, instance-adaptive token pruning (Ye et al., CVPR 2025).

An ATP module sits before decoder layer l and reads layer l-1's attention (probes, no
eager attention). For every visual token j still present:

    S_self[j]  = mean attention j receives from the other remaining visual tokens that can
                 attend to it (causal), averaged over heads      [ours: queries weighted by
                 their soft keep weight]
    S_cross[j] = mean attention j receives from the instruction tokens, averaged over heads
    each rescaled per instance to [0, 1] (divided by its max);  S_r = (S_self + S_cross) / 2
    S_s[j]     = spatial (SAP) score from a nested grid hierarchy: 1.0 on the stride-8 grid,
                 0.75 stride 4, 0.5 stride 2, 0.25 elsewhere

A threshold MLP (two heads) maps instance statistics (the scores' distributions, the fraction
of tokens remaining, the relative depth) to (theta_r, theta_s).

    training (mask mode):  m_j = max(sigmoid(tau (S_r - theta_r)), sigmoid(tau (S_s - theta_s)))
    inference (drop mode): keep j  iff  S_r > theta_r  or  S_s > theta_s

Scores are detached by default: gradients reach the thresholds through the masks [ours]. The
soft token counts per module are kept for the ATP and target-token losses (`atp_losses`).

This file is the rule; the experimental options around it [ours] (content features, score
gradients, SAP per module, shared thresholds, budget gradients and counts) are small named
pieces in `atp.token.atp_options`, each off (or the paper's behaviour) by default.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from atp.runtime.pruner import PruneContext, TokenPruner, register
from atp.token.atp_options import (
    BUDGET_COUNTS,
    BUDGET_GRADIENTS,
    NUM_CONTENT_FEATURES,
    BudgetCounts,
    content_features,
    instance_threshold_kinds,
    instance_wise_columns,
    sap_layers,
    threshold_logits,
)

__all__ = [
    "BUDGET_COUNTS",
    "BUDGET_GRADIENTS",
    "DEPTH_FRACTIONS",
    "NUM_CONTENT_FEATURES",
    "NUM_SCORE_FEATURES",
    "QUANTILES",
    "SAP_FLOOR",
    "SAP_LEVELS",
    "ATPPruner",
    "ThresholdMLP",
    "atp_losses",
    "content_features",
    "default_layers",
    "instance_features",
    "instance_threshold_kinds",
    "redundancy_scores",
    "sap_layers",
    "sap_scores",
    "sap_scores_at",
    "score_statistics",
    "tokens_per_layer",
]

DEPTH_FRACTIONS = (0.125, 0.4375, 0.75)  # before layers 4, 14, 24 of a 32-layer LLM
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
NUM_SCORE_FEATURES = 2 * (2 + len(QUANTILES)) + 2
SAP_LEVELS = ((8, 1.0), (4, 0.75), (2, 0.5))
SAP_FLOOR = 0.25


def default_layers(num_layers: int) -> list[int]:
    """round(L * {0.125, 0.4375, 0.75}), at least 1 (a module reads the previous layer)."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in DEPTH_FRACTIONS})


def redundancy_scores(ctx: PruneContext, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_self, S_cross), each [B, S] in [0, 1] on visual slots, 0 elsewhere, from the
    head-averaged attention A of decoder layer `layer`:

        S_self[j]  = sum_{i > j} w_i A[i, j] / sum_{i > j} w_i   over visual queries i (w: soft keep weight)
        S_cross[j] = mean over instruction queries i of A[i, j]

    (A is causal, so the visual queries that can attend to j are those after it.)
    """
    visual = ctx.visual
    query_weight = (ctx.weight * visual).float()  # remaining visual queries, soft-weighted
    instruction = ctx.instruction.float()
    received = ctx.attention_received(layer, torch.stack([query_weight, instruction], 1), exclude_self=True)
    later_weight = query_weight.flip(1).cumsum(1).flip(1) - query_weight  # [B, S]: sum of w_i over i > j
    s_self = torch.where(later_weight > 0, received[:, 0] / later_weight.clamp_min(1e-12), 0.0)
    s_cross = received[:, 1] / instruction.sum(1, keepdim=True).clamp_min(1.0)
    return _rescaled(s_self, visual), _rescaled(s_cross, visual)


def _rescaled(score: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    score = score.masked_fill(~visual, 0.0)
    return score / score.amax(1, keepdim=True).clamp_min(1e-12)


def sap_scores(visual_index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, S] spatial score of every visual slot (visual_index -1 elsewhere gives 0), for images
    that all share one `grid` (rows, cols), visual tokens numbered in raster order."""
    rows, cols = grid
    within = visual_index.clamp_min(0) % (rows * cols)
    return sap_scores_at(within // cols, within % cols, visual_index >= 0)


def sap_scores_at(row: torch.Tensor, col: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """[B, S] spatial score of every visual slot from its row and column in its own image's grid
    (row, col [B, S] long; visual [B, S] bool; 0 elsewhere). Per-image grids: [ours]."""
    score = torch.full(row.shape, SAP_FLOOR, device=row.device)
    for stride, value in reversed(SAP_LEVELS):
        on_grid = (row % stride == 0) & (col % stride == 0)
        score = torch.where(on_grid, torch.full_like(score, value), score)
    return score.masked_fill(~visual, 0.0)


def score_statistics(score: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, 7]: mean, std (unbiased) and QUANTILES of `score` [B, S] over the `present` [B, S]
    slots of each row, batched (no per-sample loop); 0 for a row with no present slot."""
    count = present.sum(1)
    masked = score.float().masked_fill(~present, float("nan"))
    mean = torch.nanmean(masked, 1)
    squares = ((masked - mean[:, None]) ** 2).nansum(1)
    std = torch.where(count > 1, (squares / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(mean))
    quantiles = torch.nanquantile(masked, torch.tensor(QUANTILES, device=score.device), dim=1).T  # [B, 5]
    return torch.cat([mean[:, None], std[:, None], quantiles], 1).nan_to_num(0.0)


def instance_features(
    s_self: torch.Tensor, s_cross: torch.Tensor, ctx: PruneContext, depth: float, content: bool = True
) -> torch.Tensor:
    """[B, 16 (+3)]: mean, std, quantiles of S_self and S_cross; fraction remaining; relative
    depth; with `content` [ours], the `content_features` of the remaining visual hidden states."""
    present = ctx.visual
    remaining = (ctx.weight.detach() * present).sum(1) / ctx.num_visual.clamp_min(1).float()
    parts = [
        score_statistics(s_self, present),
        score_statistics(s_cross, present),
        remaining[:, None],
        torch.full_like(remaining[:, None], depth),
    ]
    if content:
        parts.append(content_features(ctx.hidden, ctx.weight * present))
    return torch.cat(parts, 1)


class ThresholdMLP(nn.Module):
    """Instance statistics [B, F] -> (theta_r, theta_s), each [B] in (0, 1).

    offset [ours]: a learned [2] logit offset of (theta_r, theta_s) shared by every instance
    (`budget_offset`, option budget_gradients="offset", see `atp_options.BudgetCounts`)."""

    def __init__(self, num_features: int, hidden: int = 256, init_bias: float = -3.0, offset: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU())
        self.redundancy_head = nn.Linear(hidden, 1)
        self.spatial_head = nn.Linear(hidden, 1)
        for head in (self.redundancy_head, self.spatial_head):  # start near theta = 0.05: keep ~all
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.constant_(head.bias, init_bias)
        self.budget_offset = nn.Parameter(torch.zeros(2)) if offset else None

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.sigmoid(self.logits(features)).unbind(1))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[B, F] -> [B, 2] pre-sigmoid (theta_r, theta_s)."""
        hidden = self.trunk(features)
        logits = torch.cat([self.redundancy_head(hidden), self.spatial_head(hidden)], 1)
        return logits if self.budget_offset is None else logits + self.budget_offset


@register
class ATPPruner(TokenPruner):
    """Learned ATP modules before `layers` (default: round(L * {0.125, 0.4375, 0.75})).

    num_layers: the LLM's depth (for default placement and relative-depth features);
    tau: soft-mask temperature; straight_through: hard forward, soft backward in training;
    hidden: threshold-MLP width. The experimental options [ours], each documented where it
    lives in `atp.token.atp_options`: content_features (default False: the score statistics
    only), score_gradients (default False: in training, let gradients flow through the
    redundancy scores into the probed layers' q/k projections, useful only when those train,
    e.g. with LoRA), sap (default True: every module), instance_thresholds (default True: both,
    the paper), budget_gradients (default "all") and budget_count (default "mask").
    """

    name = "atp"

    def __init__(
        self,
        num_layers: int,
        layers: list[int] | None = None,
        tau: float = 10.0,
        straight_through: bool = False,
        hidden: int = 256,
        content_features: bool = False,
        score_gradients: bool = False,
        sap: bool | list[int] = True,
        instance_thresholds: bool | list[str] = True,
        budget_gradients: str = "all",
        budget_count: str = "mask",
    ) -> None:
        layers = default_layers(num_layers) if layers is None else list(layers)
        super().__init__(layers)
        if 0 in self.layers:
            raise ValueError("atp: a module reads the previous layer's attention, so layers must be >= 1.")
        self.num_layers = int(num_layers)
        self.tau = float(tau)
        self.straight_through = bool(straight_through)
        self.content_features = bool(content_features)
        self.score_gradients = bool(score_gradients)
        self.sap_layers = sap_layers(sap, self.layers)
        self.instance_thresholds = instance_threshold_kinds(instance_thresholds)
        self.budget_counts = BudgetCounts(budget_gradients, budget_count)
        self.budget_gradients, self.budget_count = self.budget_counts.gradients, self.budget_counts.count
        num_features = NUM_SCORE_FEATURES + (NUM_CONTENT_FEATURES if self.content_features else 0)
        self.modules_by_layer = nn.ModuleDict(
            {
                str(layer): ThresholdMLP(num_features, hidden, offset=self.budget_counts.needs_offset)
                for layer in self.layers
            }
        )
        self.soft_counts: dict[int, torch.Tensor] = {}  # layer -> [B] visual tokens after the module
        self.thresholds: dict[int, torch.Tensor] = {}  # layer -> [B, 2] (theta_r, theta_s)

    def validate(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(
                f"atp: built for a {self.num_layers}-layer LLM, applied to one with {num_layers} layers; "
                f"build it with num_layers={num_layers}."
            )
        super().validate(num_layers)

    def probe_layers(self) -> set[int]:
        return {layer - 1 for layer in self.layers}

    def scores(self, ctx: PruneContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S_self, S_cross, S_s), each [B, S]; detached unless training with `score_gradients` [ours]."""
        track = self.score_gradients and self.training and ctx.mode == "mask"
        with contextlib.nullcontext() if track else torch.no_grad():
            s_self, s_cross = redundancy_scores(ctx, ctx.layer - 1)
            geometry = ctx.geometry
            return s_self, s_cross, sap_scores_at(geometry.row, geometry.col, ctx.visual_index >= 0)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        """[B, S] keep decision (drop mode, or not training), or soft keep weights (mask-mode training)."""
        first = ctx.layer == min(self.layers)
        if first:
            self.soft_counts, self.thresholds = {}, {}
        s_self, s_cross, s_spatial = self.scores(ctx)
        s_redundancy = (s_self + s_cross) / 2
        depth = ctx.layer / self.num_layers  # the MLP reads statistics only: no gradient into the scores there
        features = instance_features(s_self.detach(), s_cross.detach(), ctx, depth, self.content_features)
        module = self.modules_by_layer[str(ctx.layer)]
        instance_wise = instance_wise_columns(self.instance_thresholds)  # [2] bool
        logits = threshold_logits(module, features, instance_wise)  # [B, 2]
        theta_r, theta_s = torch.sigmoid(logits).unbind(1)
        self.thresholds[ctx.layer] = torch.stack([theta_r, theta_s], 1).detach()
        sap = ctx.layer in self.sap_layers
        hard = s_redundancy > theta_r[:, None]
        if sap:
            hard = hard | (s_spatial > theta_s[:, None])
        hard = hard & ctx.visual
        if ctx.mode == "drop" or not self.training:
            self.soft_counts[ctx.layer] = (ctx.weight * hard).sum(1)
            return hard | ~ctx.visual
        soft = self._soft_mask(s_redundancy, s_spatial, theta_r, theta_s, hard, ctx.visual, sap, self.straight_through)
        if self.budget_counts.from_training_mask:  # the losses read the training mask's soft counts
            self.soft_counts[ctx.layer] = (ctx.weight * soft * ctx.visual).sum(1)
            return soft
        # [ours] budget_gradients / budget_count: the losses count through other thresholds or the hard keeps
        budget_logits = self.budget_counts.logits(logits, module, ctx.num_visual, instance_wise)
        budget_r, budget_s = torch.sigmoid(budget_logits).unbind(1)
        through = self.straight_through or self.budget_counts.hard
        counted = self._soft_mask(s_redundancy, s_spatial, budget_r, budget_s, hard, ctx.visual, sap, through)
        self.soft_counts[ctx.layer] = self.budget_counts.counts(ctx, counted, first)
        return soft

    def _soft_mask(
        self,
        s_redundancy: torch.Tensor,
        s_spatial: torch.Tensor,
        theta_r: torch.Tensor,
        theta_s: torch.Tensor,
        hard: torch.Tensor,
        visual: torch.Tensor,
        sap: bool,
        straight_through: bool,
    ) -> torch.Tensor:
        """[B, S] training mask: max(sigmoid(tau (S_r - theta_r)), sigmoid(tau (S_s - theta_s)))
        on visual slots, 1 elsewhere; with `straight_through`, `hard` forward and soft backward."""
        soft = torch.sigmoid(self.tau * (s_redundancy - theta_r[:, None]))
        if sap:
            soft = torch.maximum(soft, torch.sigmoid(self.tau * (s_spatial - theta_s[:, None])))
        if straight_through:
            soft = hard.float() + soft - soft.detach()
        return torch.where(visual, soft, torch.ones_like(soft))


def tokens_per_layer(pruner: ATPPruner, num_visual: torch.Tensor) -> torch.Tensor:
    """[B, L] (soft) visual tokens each decoder layer processes: N before the first module,
    then the count after the latest module (differentiable in training)."""
    counts, current = [], num_visual.float()
    for layer in range(pruner.num_layers):
        if layer in pruner.soft_counts:
            current = pruner.soft_counts[layer]
        counts.append(current)
    return torch.stack(counts, 1)


def atp_losses(
    pruner: ATPPruner,
    num_visual: torch.Tensor,
    target_tokens: float | torch.Tensor,
    lambda_atp: float = 0.05,
    lambda_target: float = 0.2,
    target_reduction: str = "batch",
    target_side: str = "both",
) -> dict[str, torch.Tensor]:
    """The ATP loss and the target-token loss of the last forward (docs/methods.md, "ATP-LLaVA").

    num_visual: [B] visual tokens at the LLM input (N); target_tokens: N_target (absolute,
    a float or [B]). Samples without an image are left out. Returns the weighted terms
    `atp` and `target` and the unweighted `average_tokens` ([B] mean_l n_l, the "144*").

    target_reduction: "batch" [ours] penalises the batch's mean of (mean_l n_l - N_target) / N,
    so the budget holds on average and each instance may keep more or fewer tokens;
    "instance" averages |mean_l n_l - N_target| / N over the samples, which pulls every
    image to the same count and so works against instance adaptivity.

    target_side: "both" penalises any distance from N_target (docs/methods.md); "above" [ours] only
    an excess (a ceiling, max(0, .)), so below the budget only the LM and ATP losses decide
    how many tokens to keep.
    """
    if target_side not in ("both", "above"):
        raise ValueError(f"target_side must be 'both' or 'above', got {target_side!r}.")
    distance = torch.abs if target_side == "both" else torch.relu
    n = tokens_per_layer(pruner, num_visual)  # [B, L]
    total = num_visual.float().clamp_min(1.0)
    depth = torch.arange(pruner.num_layers, device=n.device, dtype=n.dtype) / pruner.num_layers
    has_image = (num_visual > 0).float()
    denominator = has_image.sum().clamp_min(1.0)
    atp_term = ((depth * n / total[:, None]).mean(1) * has_image).sum() / denominator
    average = n.mean(1)
    excess = (average - torch.as_tensor(target_tokens, device=n.device)) / total * has_image  # [B]
    if target_reduction == "batch":
        target_term = distance(excess.sum() / denominator)
    elif target_reduction == "instance":
        target_term = distance(excess).sum() / denominator
    else:
        raise ValueError(f"target_reduction must be 'batch' or 'instance', got {target_reduction!r}.")
    return {"atp": lambda_atp * atp_term, "target": lambda_target * target_term, "average_tokens": average.detach()}
