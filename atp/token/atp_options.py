"""The experimental options of the ATP module [ours], each a small named piece that `atp.token.atp`
calls. The defaults of `ATPPruner` turn every one off (or set it to the paper's behaviour):

    content_features=False        `content_features`: extra inputs to the threshold MLP
    score_gradients=False         `ATPPruner.scores`: gradients through S_self, S_cross into q/k
    sap=True                      `sap_layers`: which modules have the spatial branch
    instance_thresholds=True      `instance_threshold_kinds`, `threshold_logits`: which thresholds vary per instance
    budget_gradients="all"        `BudgetCounts`: how the ATP and target losses reach the thresholds
    budget_count="mask"           `BudgetCounts`: which token counts those losses read

The results of each on the testbed are in docs/results.md (sections named in the docstrings).
"""

from __future__ import annotations

import torch
from torch import nn

from atp.runtime.pruner import PruneContext

NUM_CONTENT_FEATURES = 3
THRESHOLD_KINDS = ("redundancy", "spatial")  # the columns of the threshold logits: (theta_r, theta_s)
BUDGET_GRADIENTS = ("all", "level", "offset")
BUDGET_COUNTS = ("mask", "hard")


def content_features(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, 3] how alike the remaining visual tokens are (option `content_features`) [ours].

    hidden: [B, S, d] hidden states; weight: [B, S] keep weight (0 on absent and non-visual
    slots). With h_bar the weighted mean of the h_j: the weighted mean and std of
    cos(h_j, h_bar), and the relative spread sqrt(E|h_j - h_bar|^2 / E|h_j|^2) in [0, 1]
    (0 when every token is the same vector). All are invariant to the hidden states' scale;
    a row with no remaining token gets zeros. An image of near-identical tokens is redundant,
    one with many distinct objects is not; on the testbed these features changed neither
    accuracy nor adaptivity (docs/results.md, section 4).
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


def sap_layers(sap: bool | list[int], layers: tuple[int, ...]) -> frozenset[int]:
    """The module layers with a spatial branch (option `sap`): all (True, the paper), none (False,
    the paper's "without SAP" ablation, redundancy scores only) or those listed [ours]."""
    if isinstance(sap, bool):
        return frozenset(layers if sap else ())
    chosen = frozenset(int(layer) for layer in sap)
    if not chosen <= set(layers):
        raise ValueError(f"atp: sap={sorted(chosen)} names layers without a module; modules sit before {list(layers)}.")
    return chosen


def instance_threshold_kinds(instance_thresholds: bool | list[str]) -> frozenset[str]:
    """The thresholds predicted per instance (option `instance_thresholds`): both (True, the
    paper), none (False) or those listed of "redundancy" / "spatial" [ours]."""
    kinds = set(THRESHOLD_KINDS)
    if isinstance(instance_thresholds, bool):
        return frozenset(kinds if instance_thresholds else ())
    chosen = frozenset(instance_thresholds)
    if not chosen <= kinds:
        raise ValueError(
            f"atp: instance_thresholds={sorted(chosen)} names unknown thresholds; use true, false or a list of "
            "'redundancy' and 'spatial'."
        )
    return chosen


def instance_wise_columns(kinds: frozenset[str]) -> torch.Tensor:
    """[2] bool: which of (theta_r, theta_s) is predicted per instance."""
    return torch.tensor([kind in kinds for kind in THRESHOLD_KINDS])


def threshold_logits(module: nn.Module, features: torch.Tensor, instance_wise: torch.Tensor) -> torch.Tensor:
    """[B, 2] pre-sigmoid (theta_r, theta_s) from the threshold MLP `module` and instance
    features [B, F]. An instance-wise threshold is the MLP's output for the instance (the paper);
    one that is not [ours] is the MLP's output for a constant (zero) input: one learned value per
    module for every instance. The kept count still differs per instance (how many tokens score
    above the thresholds); with ["redundancy"], every instance gets the same SAP grid at a module."""
    return torch.where(
        instance_wise.to(features.device), module.logits(features), module.logits(torch.zeros_like(features))
    )


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"atp: {option} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


class BudgetCounts:
    """The token counts the ATP and target losses read in training (options `budget_gradients`
    and `budget_count`) [ours]. With the defaults ("all", "mask") they are the training mask's
    own soft counts (`from_training_mask`), and this object is not used.

    budget_gradients: how those losses train the threshold MLP. "all": through each instance's
    threshold. "level": the losses see every instance-wise threshold logit as the batch mean plus
    a constant offset, so they move the common level of the thresholds (through every MLP
    parameter) and the spread between instances is learned from the LM loss alone. It tests one
    hypothesis: an instance's budget gradient is proportional to how many of its tokens score near
    its threshold, largest for busy images, so under "all" the budget pushes their thresholds up
    hardest. On the testbed the thresholds rose with the object count under "level" as well
    (docs/results.md, section 2): the level still moves through the MLP's weights,
    which shift each instance's logit by its own hidden features. "offset": every module gets a
    learned logit offset per threshold, shared by all instances (`ThresholdMLP.budget_offset`, in
    the pruner's parameters under that name, so a trainer can give it its own learning rate), and
    the budget losses train only it; the MLP learns from the LM loss alone, the offset from both.
    On the testbed the LM-learned redundancy threshold before layer 3 then fell with the object
    count, but the spatial thresholds settled on SAP grid levels (docs/results.md,
    section 2).

    budget_count: "mask": the counts of the training mask (soft, or hard with `straight_through`).
    "hard": the hard keep decisions that inference makes, with the soft mask's gradient
    (straight-through for the counts only), so that soft-mask training still holds the budget
    that inference keeps: with soft masks alone, the soft counts met the budget in training and
    the hard ones fell short of it (docs/results.md, section 2). On the testbed the
    hard counts held the budget at inference, but the spatial thresholds settled on SAP grid
    levels again and the adaptivity was lost (docs/results.md, section 2).
    """

    def __init__(self, budget_gradients: str = "all", budget_count: str = "mask") -> None:
        self.gradients = check_choice("budget_gradients", budget_gradients, BUDGET_GRADIENTS)
        self.count = check_choice("budget_count", budget_count, BUDGET_COUNTS)
        self.weight: torch.Tensor | None = None  # [B, S] product of the counted masks so far in this forward

    @property
    def from_training_mask(self) -> bool:
        """True for the defaults: the losses read the training mask's counts (the paper)."""
        return self.gradients == "all" and self.count == "mask"

    @property
    def hard(self) -> bool:
        """Count the hard keep decisions (straight-through) whatever the training mask is."""
        return self.count == "hard"

    @property
    def needs_offset(self) -> bool:
        """The threshold MLPs need a learned shared logit offset (`ThresholdMLP.budget_offset`)."""
        return self.gradients == "offset"

    def logits(
        self, logits: torch.Tensor, module: nn.Module, num_visual: torch.Tensor, instance_wise: torch.Tensor
    ) -> torch.Tensor:
        """[B, 2] the threshold logits as the budget losses see them: the same values; "all": every
        gradient, "offset": only the module's offset's, "level": the instance-wise logits as their
        batch mean (over samples with an image, num_visual [B] > 0) plus a constant."""
        if self.gradients == "all":
            return logits
        if self.gradients == "offset":
            return (logits - module.budget_offset).detach() + module.budget_offset
        with_image = (num_visual > 0).float()[:, None]  # [B, 1]
        level = (logits * with_image).sum(0) / with_image.sum().clamp_min(1.0)  # [2]
        return torch.where(instance_wise.to(logits.device), level + (logits - level).detach(), logits)

    def counts(self, ctx: PruneContext, counted: torch.Tensor, first: bool) -> torch.Tensor:
        """[B] visual tokens after this module as the losses count them: the product of the counted
        masks [B, S] of this module and the earlier ones (mask mode keeps the sequence length);
        `first`: this is the first module of the forward (start from the runtime's weight)."""
        earlier = ctx.weight if first else self.weight
        self.weight = earlier * counted
        return (self.weight * ctx.visual).sum(1)
