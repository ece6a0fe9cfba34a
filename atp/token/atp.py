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

A threshold MLP (two heads) maps instance statistics to (theta_r, theta_s): the scores'
distributions, and [ours] how alike the remaining visual hidden states are (`content_features`:
an image of near-identical tokens is redundant, one with many distinct objects is not).

    training (mask mode):  m_j = max(sigmoid(tau (S_r - theta_r)), sigmoid(tau (S_s - theta_s)))
    inference (drop mode): keep j  iff  S_r > theta_r  or  S_s > theta_s

Scores are detached by default: gradients reach the thresholds through the masks [ours].
With `score_gradients` the masks' gradients also flow back through S_self and S_cross into
the probed layer's q/k projections, so LoRA on the LLM can learn which tokens its attention
should rank high (the LLM's own weights stay frozen either way) [ours]. The soft token counts
per module are kept for the ATP and target-token losses (`atp_losses`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from atp.token.base import PruneContext, TokenPruner, register

DEPTH_FRACTIONS = (0.125, 0.4375, 0.75)  # before layers 4, 14, 24 of a 32-layer LLM
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
NUM_SCORE_FEATURES = 2 * (2 + len(QUANTILES)) + 2
NUM_CONTENT_FEATURES = 3
SAP_LEVELS = ((8, 1.0), (4, 0.75), (2, 0.5))
SAP_FLOOR = 0.25
BUDGET_GRADIENTS = ("all", "level", "offset")
BUDGET_COUNTS = ("mask", "hard")


def default_layers(num_layers: int) -> list[int]:
    """round(L * {0.125, 0.4375, 0.75}), at least 1 (a module reads the previous layer)."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in DEPTH_FRACTIONS})


def sap_scores(visual_index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, S] spatial score of every visual slot (visual_index -1 elsewhere gives 0)."""
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


def sap_layers(sap: bool | list[int], layers: tuple[int, ...]) -> frozenset[int]:
    """The module layers with a spatial branch: all (True), none (False) or those listed."""
    if isinstance(sap, bool):
        return frozenset(layers if sap else ())
    chosen = frozenset(int(layer) for layer in sap)
    if not chosen <= set(layers):
        raise ValueError(f"atp: sap={sorted(chosen)} names layers without a module; modules sit before {list(layers)}.")
    return chosen


def instance_threshold_kinds(instance_thresholds: bool | list[str]) -> frozenset[str]:
    """The thresholds predicted per instance: both (True), none (False) or those listed."""
    kinds = {"redundancy", "spatial"}
    if isinstance(instance_thresholds, bool):
        return frozenset(kinds if instance_thresholds else ())
    chosen = frozenset(instance_thresholds)
    if not chosen <= kinds:
        raise ValueError(
            f"atp: instance_thresholds={sorted(chosen)} names unknown thresholds; use true, false or a list of "
            "'redundancy' and 'spatial'."
        )
    return chosen


class ThresholdMLP(nn.Module):
    """Instance statistics [B, F] -> (theta_r, theta_s), each [B] in (0, 1)."""

    def __init__(self, num_features: int, hidden: int = 256, init_bias: float = -3.0, offset: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU())
        self.redundancy_head = nn.Linear(hidden, 1)
        self.spatial_head = nn.Linear(hidden, 1)
        for head in (self.redundancy_head, self.spatial_head):  # start near theta = 0.05: keep ~all
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.constant_(head.bias, init_bias)
        # [2] logit offset of (theta_r, theta_s) shared by every instance (budget_gradients="offset")
        self.budget_offset = nn.Parameter(torch.zeros(2)) if offset else None

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.sigmoid(self.logits(features)).unbind(1))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[B, F] -> [B, 2] pre-sigmoid (theta_r, theta_s)."""
        hidden = self.trunk(features)
        logits = torch.cat([self.redundancy_head(hidden), self.spatial_head(hidden)], 1)
        return logits if self.budget_offset is None else logits + self.budget_offset


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


def content_features(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, 3] how alike the remaining visual tokens are [ours].

    hidden: [B, S, d] hidden states; weight: [B, S] keep weight (0 on absent and non-visual
    slots). With h_bar the weighted mean of the h_j: the weighted mean and std of
    cos(h_j, h_bar), and the relative spread sqrt(E|h_j - h_bar|^2 / E|h_j|^2) in [0, 1]
    (0 when every token is the same vector). All are invariant to the hidden states' scale;
    a row with no remaining token gets zeros.
    """
    hidden, weight = hidden.detach().float(), weight.detach().float()
    total = weight.sum(1).clamp_min(1e-12)  # [B]

    def weighted_mean(values: torch.Tensor) -> torch.Tensor:  # [B, S, ...] -> [B, ...]
        shape = weight.shape + (1,) * (values.dim() - 2)
        return (weight.view(shape) * values).sum(1) / total.view((-1,) + (1,) * (values.dim() - 2))

    mean_token = weighted_mean(hidden)  # [B, d]
    cosine = nn.functional.cosine_similarity(hidden, mean_token[:, None], dim=-1)  # [B, S]
    cosine_mean = weighted_mean(cosine)
    cosine_std = weighted_mean((cosine - cosine_mean[:, None]) ** 2).sqrt()
    energy = weighted_mean(hidden.pow(2).sum(-1)).clamp_min(1e-12)  # 0 only where no token remains
    spread = weighted_mean((hidden - mean_token[:, None]).pow(2).sum(-1)) / energy
    return torch.stack([cosine_mean, cosine_std, spread.clamp_min(0).sqrt()], 1)


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
    depth; with `content`, the `content_features` of the remaining visual hidden states."""
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


@register
class ATPPruner(TokenPruner):
    """Learned ATP modules before `layers` (default: round(L * {0.125, 0.4375, 0.75})).

    num_layers: the LLM's depth (for default placement and relative-depth features);
    tau: soft-mask temperature; straight_through: hard forward, soft backward in training;
    hidden: threshold-MLP width; content_features: also feed the threshold MLP how alike the
    remaining visual hidden states are [ours] (default False: the score statistics only; on
    the testbed the extra features did not change accuracy or adaptivity, see the README);
    score_gradients: in training, let gradients flow through the redundancy scores into the
    probed layers' q/k projections (useful only when those train, e.g. with LoRA) [ours];
    sap: which modules have the spatial branch: True every one, False none (the paper's
    "without SAP" ablation, redundancy scores only), or a list of module layers [ours];
    instance_thresholds: which thresholds the MLP predicts per instance: True both (the paper),
    False neither, or a list of "redundancy" / "spatial" [ours]. A threshold that is not
    instance-wise is the MLP's output for a constant (zero) input: one learned value per module
    for every instance. The kept count still differs per instance (how many tokens score above
    the thresholds); with ["redundancy"], every instance gets the same SAP grid at a module.
    budget_gradients: how the ATP and target losses train the threshold MLP [ours]. "all": through
    each instance's threshold. "level": the losses see every instance's threshold logit as the
    batch mean plus a constant offset, so they move the common level of the thresholds (through
    every MLP parameter) and the spread between instances is learned from the LM loss alone.
    It tests one hypothesis: an instance's budget gradient is proportional to how many of its
    tokens score near its threshold, largest for busy images, so under "all" the budget pushes
    their thresholds up hardest. On the testbed the thresholds rose with the object count
    under "level" as well (README, "Two more causes tested on b2"): the level still moves
    through the MLP's weights, which shift each instance's logit by its own hidden features.
    "offset": every module gets a learned logit offset per threshold, shared by all instances
    (`ThresholdMLP.budget_offset`, in the pruner's parameters under that name, so a trainer
    can give it its own learning rate), and the budget losses train only it; the MLP learns
    from the LM loss alone, the offset from both. On the testbed the LM-learned redundancy
    threshold before layer 3 then fell with the object count, but the spatial thresholds
    settled on SAP grid levels (README, "The budget on a learned offset").
    budget_count: which token counts the ATP and target losses read in training [ours]. "mask":
    those of the training mask (soft, or hard with `straight_through`). "hard": the hard keep
    decisions that inference makes, with the soft mask's gradient (straight-through for the
    counts only), so that soft-mask training (`straight_through=False`) still holds the budget
    that inference keeps: with soft masks alone, the soft counts met the budget in training and
    the hard ones fell short of it (README, "The budget on a learned offset"). On the testbed
    the hard counts held the budget at inference, but the spatial thresholds settled on SAP
    grid levels again and the adaptivity was lost (README, "The budget on the hard counts").
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
        if budget_gradients not in BUDGET_GRADIENTS:
            choices = ", ".join(map(repr, BUDGET_GRADIENTS))
            raise ValueError(f"atp: budget_gradients must be one of {choices}, got {budget_gradients!r}.")
        self.budget_gradients = budget_gradients
        if budget_count not in BUDGET_COUNTS:
            choices = ", ".join(map(repr, BUDGET_COUNTS))
            raise ValueError(f"atp: budget_count must be one of {choices}, got {budget_count!r}.")
        self.budget_count = budget_count
        num_features = NUM_SCORE_FEATURES + (NUM_CONTENT_FEATURES if self.content_features else 0)
        offset = budget_gradients == "offset"
        self.modules_by_layer = nn.ModuleDict(
            {str(layer): ThresholdMLP(num_features, hidden, offset=offset) for layer in self.layers}
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
        """(S_self, S_cross, S_s), each [B, S]; detached unless training with `score_gradients`."""
        track = self.score_gradients and self.training and ctx.mode == "mask"
        with contextlib.nullcontext() if track else torch.no_grad():
            s_self, s_cross = redundancy_scores(ctx, ctx.layer - 1)
            geometry = ctx.geometry
            return s_self, s_cross, sap_scores_at(geometry.row, geometry.col, ctx.visual_index >= 0)

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        if ctx.layer == min(self.layers):
            self.soft_counts, self.thresholds = {}, {}
        s_self, s_cross, s_spatial = self.scores(ctx)
        s_redundancy = (s_self + s_cross) / 2
        depth = ctx.layer / self.num_layers  # the MLP reads statistics only: no gradient into the scores there
        features = instance_features(s_self.detach(), s_cross.detach(), ctx, depth, self.content_features)
        module = self.modules_by_layer[str(ctx.layer)]
        instance_wise = torch.tensor([kind in self.instance_thresholds for kind in ("redundancy", "spatial")])
        logits = torch.where(  # [B, 2]; a threshold that is not instance-wise: the MLP's output for a zero input
            instance_wise.to(features.device), module.logits(features), module.logits(torch.zeros_like(features))
        )
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
        count_hard = self.budget_count == "hard"
        if self.budget_gradients == "all" and not count_hard:
            self.soft_counts[ctx.layer] = (ctx.weight * soft * ctx.visual).sum(1)
            return soft
        # the counts the losses read, through this module's mask and the earlier ones': hard with
        # budget_count="hard", and moved only by the thresholds' common level with "level" and "offset"
        budget_r, budget_s = torch.sigmoid(self._budget_logits(logits, module, ctx, instance_wise)).unbind(1)
        through = self.straight_through or count_hard
        counted = self._soft_mask(s_redundancy, s_spatial, budget_r, budget_s, hard, ctx.visual, sap, through)
        earlier = ctx.weight if ctx.layer == min(self.layers) else self._budget_weight
        self._budget_weight = earlier * counted  # [B, S]: mask mode keeps the sequence length
        self.soft_counts[ctx.layer] = (self._budget_weight * ctx.visual).sum(1)
        return soft

    def _budget_logits(
        self, logits: torch.Tensor, module: ThresholdMLP, ctx: PruneContext, instance_wise: torch.Tensor
    ) -> torch.Tensor:
        """[B, 2] the threshold logits as the budget losses see them: the same values; "all": every
        gradient, "offset": only the module's offset's, "level": the instance-wise logits as their
        batch mean (over samples with an image) plus a constant."""
        if self.budget_gradients == "all":
            return logits
        if self.budget_gradients == "offset":
            return (logits - module.budget_offset).detach() + module.budget_offset
        with_image = (ctx.num_visual > 0).float()[:, None]  # [B, 1]
        level = (logits * with_image).sum(0) / with_image.sum().clamp_min(1.0)  # [2]
        return torch.where(instance_wise.to(logits.device), level + (logits - level).detach(), logits)

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
    """The ATP loss and the target-token loss of the last forward (METHODS.md section 1).

    num_visual: [B] visual tokens at the LLM input (N); target_tokens: N_target (absolute,
    a float or [B]). Samples without an image are left out. Returns the weighted terms
    `atp` and `target` and the unweighted `average_tokens` ([B] mean_l n_l, the "144*").

    target_reduction: "batch" [ours] penalises the batch's mean of (mean_l n_l - N_target) / N,
    so the budget holds on average and each instance may keep more or fewer tokens;
    "instance" averages |mean_l n_l - N_target| / N over the samples, which pulls every
    image to the same count and so works against instance adaptivity.

    target_side: "both" penalises any distance from N_target (METHODS.md); "above" [ours] only
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
