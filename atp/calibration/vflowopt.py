"""Fit VFlowOpt's pruning settings by visual-information-flow optimisation (Yang et al., ICCV 2025).

The objective of a setting (keep_ratios, t, merge_grid, alpha) is the sum over calibration prompts of the
cosine similarity between the model's last hidden state (after the final norm) at the last prompt token
with and without pruning: the official code's "flow" signal. The share kept at the last stage is not
searched: it follows from the budget, the average share of visual tokens the decoder layers see,

    target * L = sum_s  prod_{u <= s} r_u * (l_{s+1} - l_s)        (l_0 = 0, l_{S} = L, stages s = 0..S-1)

solved for r_{S-1} and capped at 1 (recycled tokens are not counted, as in the official constraint).
Search: Bayesian optimisation, `initial_points` uniform random settings then, each call, the candidate of
`CANDIDATES` random ones with the largest expected improvement under a Gaussian process (Matern 5/2 kernel on
the unit cube, length scale from a small grid by marginal likelihood). The official code runs
scikit-optimize's GP optimiser (27 random points of 300 calls); this is a small torch re-implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atp.progress import progress
from atp.runtime import attach
from atp.token.vflowopt import VFlowOpt

CANDIDATES = 2048  # random candidates scored by expected improvement per call
LENGTH_SCALES = (0.1, 0.2, 0.4, 0.8)  # Matern length scales tried on the unit cube
NOISE = 1e-6  # jitter on the kernel diagonal
# The official search space (LLaVA-OneVision-7B, stages 0, 9, 18 and an average share of 0.25):
OFFICIAL_SPACE = {
    "keep_ratios": [[0.25, 0.375], [0.2 / 0.375, 1.0]],  # the free stages (the last one is solved for)
    "t": [0.0, 50.0],
    "merge_grid": [3.0, 24.0],
    "alpha": [-1.0, 1.0],
}


def last_keep_ratio(free: list[float], layers: list[int], num_layers: int, target: float) -> float:
    """The last stage's share that makes the average share over the decoder layers `target` (at most 1)."""
    bounds = list(layers) + [num_layers]
    product, covered = 1.0, 0.0
    for s, ratio in enumerate(free):
        product *= ratio
        covered += product * (bounds[s + 1] - bounds[s])
    span = num_layers - layers[-1]
    return min(1.0, (target * num_layers - covered) / (span * product))


def average_share(ratios: list[float], layers: list[int], num_layers: int) -> float:
    """The average share of visual tokens the decoder layers see under `ratios` (no recycling)."""
    bounds = list(layers) + [num_layers]
    product, covered = 1.0, 0.0
    for s, ratio in enumerate(ratios):
        product *= ratio
        covered += product * (bounds[s + 1] - bounds[s])
    return covered / num_layers


def matern52(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, m] Matern 5/2 kernel between points a [n, d] and b [m, d]."""
    r = torch.cdist(a, b) * math.sqrt(5.0) / scale
    return (1.0 + r + r * r / 3.0) * torch.exp(-r)


def expected_improvement(x: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[m] EI (maximisation) of candidates [m, d] under a GP fitted to (x [n, d], y [n]) on the unit cube."""
    x, y, candidates = x.double(), y.double(), candidates.double()
    mean, std = y.mean(), y.std().clamp_min(1e-12) if len(y) > 1 else torch.tensor(1.0, dtype=torch.float64)
    z = (y - mean) / std
    best = None
    for scale in LENGTH_SCALES:
        k = matern52(x, x, scale) + NOISE * torch.eye(len(x), dtype=torch.float64)
        chol = torch.linalg.cholesky(k)
        alpha = torch.cholesky_solve(z[:, None], chol)
        evidence = -0.5 * float(z @ alpha[:, 0]) - float(torch.log(torch.diagonal(chol)).sum())
        if best is None or evidence > best[0]:
            best = (evidence, scale, chol, alpha)
    _, scale, chol, alpha = best
    cross = matern52(candidates, x, scale)  # [m, n]
    mu = (cross @ alpha)[:, 0]
    v = torch.cholesky_solve(cross.T, chol)
    sigma = (1.0 - (cross * v.T).sum(1)).clamp_min(1e-12).sqrt()
    gain = (mu - z.max()) / sigma
    normal = torch.distributions.Normal(0.0, 1.0)
    return (mu - z.max()) * normal.cdf(gain) + sigma * torch.exp(normal.log_prob(gain))


@dataclass
class Trial:
    """One evaluated setting and its objective (the summed cosine similarity)."""

    keep_ratios: list[float]
    t: float
    merge_grid: float
    alpha: float
    similarity: float

    def recipe(self, layers: list[int], vision_layer: int) -> dict:
        return dict(
            layers=list(layers),
            keep_ratios=self.keep_ratios,
            t=self.t,
            alpha=self.alpha,
            merge_grid=self.merge_grid,
            vision_layer=vision_layer,
        )


class VFlowOptSearch:
    """model: an HF VLM (no pruner attached); batches: model-input dicts of prompts (input_ids,
    attention_mask, pixel_values, ...); layers: the stages (0 first); target: the average share of visual
    tokens the decoder layers see, in (0, 1); space: bounds of the searched values (OFFICIAL_SPACE's keys);
    vision_layer: the tower layer whose attention builds the map."""

    def __init__(
        self,
        model,
        batches: list[dict],
        layers: list[int],
        target: float,
        space: dict | None = None,
        seed: int = 42,
        vision_layer: int = -2,
    ) -> None:
        if not isinstance(target, (int, float)) or not 0.0 < float(target) < 1.0:
            raise ValueError(
                f"vflowopt: target (the average share of visual tokens kept) must be in (0, 1), got {target!r}."
            )
        if not batches:
            raise ValueError(
                "vflowopt: the calibration set is empty; give at least one prompt (fit.calibration_samples)."
            )
        self.model, self.batches, self.layers, self.target = model, batches, [int(x) for x in layers], float(target)
        self.vision_layer = int(vision_layer)
        self.space = {
            k: (v if k != "keep_ratios" else [list(b) for b in v]) for k, v in dict(space or OFFICIAL_SPACE).items()
        }
        if sorted(self.space) != sorted(OFFICIAL_SPACE):
            raise ValueError(
                f"vflowopt: the search space needs the keys {sorted(OFFICIAL_SPACE)}, got {sorted(self.space)}."
            )
        if len(self.space["keep_ratios"]) != len(self.layers) - 1:
            raise ValueError(
                f"vflowopt: {len(self.layers)} stages {self.layers} need bounds for {len(self.layers) - 1} free keep "
                f"ratios (the last is solved from the target), got {len(self.space['keep_ratios'])}."
            )
        self.bounds = torch.tensor(
            [*self.space["keep_ratios"], self.space["t"], self.space["merge_grid"], self.space["alpha"]],
            dtype=torch.float64,
        )  # [d, 2]
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(model.parameters()).device
        self.num_layers = int(model.config.text_config.num_hidden_layers)
        VFlowOpt(layers=self.layers, keep_ratios=[1.0] * len(self.layers), t=0.0, alpha=0.0, setting=None).validate(
            self.num_layers
        )
        self.reference = self._last_states(None)  # per batch [B, d] without pruning

    def _inputs(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.inference_mode()
    def _last_states(self, pruner: VFlowOpt | None) -> list[torch.Tensor]:
        """Per batch [B, d]: the last hidden state (after the final norm) at each prompt's last token."""
        if pruner is not None:
            attach.apply(self.model, pruner, mode="drop")
        try:
            states = []
            for batch in self.batches:
                inputs = self._inputs(batch)
                hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1]  # [B, S, d]
                mask = inputs["attention_mask"]
                last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # the last real token of each row
                states.append(hidden[torch.arange(hidden.shape[0]), last].float().cpu())
            return states
        finally:
            if pruner is not None:
                attach.remove(self.model)

    def setting(self, point: torch.Tensor) -> dict:
        """The pruner arguments of a point [d] in the search box."""
        free = [float(v) for v in point[: len(self.layers) - 1]]
        last = max(last_keep_ratio(free, self.layers, self.num_layers, self.target), 1e-6)
        t, merge_grid, alpha = (float(v) for v in point[len(self.layers) - 1 :])
        return dict(keep_ratios=free + [last], t=t, merge_grid=merge_grid, alpha=alpha)

    def similarity(self, setting: dict) -> float:
        """Summed cosine similarity of the pruned and unpruned last hidden states over the calibration set."""
        pruner = VFlowOpt(layers=self.layers, setting=None, vision_layer=self.vision_layer, **setting)
        total = 0.0
        for pruned, reference in zip(self._last_states(pruner), self.reference):
            cosine = torch.nn.functional.cosine_similarity(pruned, reference, dim=-1)
            total += float(torch.nan_to_num(cosine, nan=0.0).sum())  # the official code counts NaN as 0
        return total

    def fit(self, calls: int, initial_points: int) -> tuple[Trial, list[Trial]]:
        """(the best trial, every trial): `calls` evaluations, the first `initial_points` at random."""
        if calls < 1 or not 1 <= initial_points:
            raise ValueError(f"vflowopt: calls and initial_points must be >= 1, got {calls} and {initial_points}.")
        low, high = self.bounds[:, 0], self.bounds[:, 1]
        unit, trials = [], []
        for call in progress(range(calls), "vflowopt: search", unit="setting"):
            if call < initial_points:
                point = torch.rand(len(low), generator=self.generator, dtype=torch.float64)
            else:
                candidates = torch.rand(CANDIDATES, len(low), generator=self.generator, dtype=torch.float64)
                scores = torch.tensor([t.similarity for t in trials], dtype=torch.float64)
                point = candidates[expected_improvement(torch.stack(unit), scores, candidates).argmax()]
            unit.append(point)
            setting = self.setting(low + point * (high - low))
            trials.append(Trial(similarity=self.similarity(setting), **setting))
        best = max(trials, key=lambda trial: trial.similarity)
        return best, trials
