"""Measured prefill latency of several pruned models, robust to a busy machine.

Every round times each contender once on the same batches, in a rotated order, after
`warmup` untimed rounds; the ratio of a contender to the reference is taken per round (both
timed within seconds of each other, so a load spike hits both) and summarised by its median
and its range over rounds. A wide range means the machine was busy: `LatencyRatio.warning`
says so instead of letting a noisy ratio read as a speed-up or a slow-down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import atp
from atp.progress import progress

SPREAD_WARNING = 0.25  # warn when (max - min) / median of the per-round ratios exceeds this


@dataclass(frozen=True)
class Contender:
    """One timed configuration: `model` with `pruner` attached (None: the stock model)."""

    name: str
    model: nn.Module
    pruner: atp.TokenPruner | None
    mode: str = "drop"


@dataclass(frozen=True)
class LatencyRatio:
    """Per-round prefill time of a contender / the reference's, over the timed rounds."""

    median: float
    low: float  # min over rounds
    high: float  # max over rounds
    rounds: int

    @classmethod
    def from_times(cls, times: Sequence[float], reference: Sequence[float]) -> LatencyRatio:
        ratios = [t / r for t, r in zip(times, reference, strict=True)]
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(ratios))

    @property
    def relative_spread(self) -> float:
        return (self.high - self.low) / self.median

    def warning(self, threshold: float = SPREAD_WARNING) -> str | None:
        """Why this ratio cannot be read as a speed-up or slow-down, or None when it can."""
        reasons = []
        if self.rounds > 1 and self.low <= 1.0 <= self.high:
            reasons.append(f"the per-round ratios ({self.low:.2f}x to {self.high:.2f}x) lie on both sides of 1.0")
        if self.relative_spread > threshold:
            reasons.append(
                f"their range is {100 * self.relative_spread:.0f} % of the median (over {100 * threshold:.0f} %)"
            )
        if not reasons:
            return None
        return "; ".join(reasons) + ": the machine was busy or the difference is too small to measure."

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def _prefill_seconds(model: nn.Module, batches: list[dict]) -> float:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for inputs in batches:
        model(**inputs, logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _attach(contender: Contender) -> None:
    atp.remove(contender.model)
    if contender.pruner is not None:
        atp.apply(contender.model, contender.pruner, mode=contender.mode)


@torch.inference_mode()
def interleaved_prefill_times(
    contenders: Sequence[Contender], batches: list[dict], repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """{name: [seconds per timed round]}: each round runs every contender's prefill over
    `batches` (model-input dicts on the model's device), rotating the order by one per round.
    Each model gets back the pruner it had attached before the call."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}.")
    before = {id(c.model): (c.model, getattr(c.model, "_atp_runtime", None)) for c in contenders}
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for round_index in progress(range(warmup + repeats), "latency rounds"):
            shift = round_index % len(contenders)
            for contender in [*contenders[shift:], *contenders[:shift]]:
                _attach(contender)
                seconds = _prefill_seconds(contender.model, batches)
                if round_index >= warmup:
                    times[contender.name].append(seconds)
    finally:
        for model, runtime in before.values():
            atp.remove(model)
            if runtime is not None:
                atp.apply(model, runtime.pruner, mode=runtime.mode)
    return times


def latency_ratios(times: dict[str, list[float]], reference: str) -> dict[str, LatencyRatio]:
    """Every contender's `LatencyRatio` against `reference` (paired round by round)."""
    if reference not in times:
        raise ValueError(f"reference {reference!r} was not timed; timed: {sorted(times)}.")
    return {name: LatencyRatio.from_times(t, times[reference]) for name, t in times.items()}
