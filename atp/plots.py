"""Pictures of evaluation results (PNG, matplotlib's Agg backend: no display needed).

- `plot_pareto`: accuracy versus average visual tokens per decoder layer and versus prefill
  FLOPs, one line per method over its budgets, the unpruned model as a reference line;
- `plot_kept_tokens_per_layer`: visual tokens each decoder layer processes, per method;
- `plot_tokens_vs_objects`: mean kept tokens per number of objects in the image (adaptivity).

Every function returns the series it drew, read back from the figure's lines, so tests and
callers can check the picture against the table it illustrates.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from atp.evaluation import EvaluationResult  # noqa: E402

Series = dict[str, list[tuple[float, float]]]


def method_family(method: str) -> str:
    """The method's name without its budget: "fastv @ 192 tokens" -> "fastv"."""
    return re.sub(r" @ \d+ tokens$", "", method)


def _read_back(axes) -> Series:
    return {
        line.get_label(): [(float(x), float(y)) for x, y in line.get_xydata()]
        for line in axes.get_lines()
        if not line.get_label().startswith("_")
    }


def _save(figure, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_pareto(results: list[EvaluationResult], path: str | Path, title: str = "") -> dict[str, Series]:
    """Accuracy (%) vs avg visual tokens per layer and vs prefill FLOPs (% of unpruned).

    results: evaluations of one model; rows named "<method> @ <N> tokens" join one line per
    method, the row named "unpruned" becomes the dashed reference. Returns
    {"tokens": {label: [(x, y)]}, "flops": {...}}, each label's points in drawing order.
    """
    unpruned = next((r for r in results if r.method == "unpruned"), None)
    families: dict[str, list[EvaluationResult]] = {}
    for r in results:
        if r is not unpruned:
            families.setdefault(method_family(r.method), []).append(r)
    figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axes, x_of, x_label in (
        (by_tokens, lambda r: r.avg_visual_tokens, "average visual tokens per decoder layer"),
        (by_flops, lambda r: 100 * r.flops_ratio, "prefill FLOPs (% of unpruned)"),
    ):
        for family, rows in sorted(families.items()):
            rows = sorted(rows, key=x_of)
            axes.plot([x_of(r) for r in rows], [100 * r.accuracy for r in rows], marker="o", label=family)
        if unpruned is not None:
            axes.plot(
                [x_of(unpruned)], [100 * unpruned.accuracy], marker="*", markersize=12, color="black", label="unpruned"
            )
            axes.axhline(100 * unpruned.accuracy, color="black", linestyle="--", linewidth=1, label="_reference")
        axes.set_xlabel(x_label)
        axes.grid(alpha=0.3)
    by_tokens.set_ylabel("accuracy (%)")
    by_flops.legend(fontsize=8, loc="lower right")
    if title:
        figure.suptitle(title)
    series = {"tokens": _read_back(by_tokens), "flops": _read_back(by_flops)}
    _save(figure, path)
    return series


def plot_kept_tokens_per_layer(results: list[EvaluationResult], path: str | Path, title: str = "") -> Series:
    """Mean visual tokens each decoder layer processed, one line per result (x: layer index)."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results:
        if not r.visual_tokens_per_layer:
            raise ValueError(f"{r.method!r} has no visual_tokens_per_layer (evaluated before they were recorded).")
        layers = range(len(r.visual_tokens_per_layer))
        axes.plot(list(layers), r.visual_tokens_per_layer, marker="o", drawstyle="steps-post", label=r.method)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("visual tokens processed (mean over samples)")
    axes.set_ylim(bottom=0)
    return _finish(figure, axes, path, title)


def _finish(figure, axes, path: str | Path, title: str) -> Series:
    """Grid, legend and title on a one-panel figure; save it and return the series it drew."""
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    if title:
        axes.set_title(title)
    series = _read_back(axes)
    _save(figure, path)
    return series


def tokens_by_object_count(result: EvaluationResult) -> list[tuple[int, float]]:
    """[(number of objects, mean avg visual tokens per layer of those samples)], by count."""
    groups: dict[int, list[float]] = {}
    for sample in result.per_sample:
        groups.setdefault(int(sample["num_objects"]), []).append(float(sample["avg_visual_tokens"]))
    return [(count, statistics.fmean(tokens)) for count, tokens in sorted(groups.items())]


def plot_tokens_vs_objects(results: list[EvaluationResult], path: str | Path, title: str = "") -> Series:
    """Mean kept visual tokens (average per layer) versus the number of objects in the image,
    one line per result; the legend gives each result's Spearman correlation."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results:
        points = tokens_by_object_count(r)
        if not points or points[0][0] < 0:
            raise ValueError(f"{r.method!r}: the samples do not say how many objects they show.")
        rho = "-" if r.spearman_tokens_objects is None else f"{r.spearman_tokens_objects:.2f}"
        axes.plot(*zip(*points), marker="o", label=f"{r.method} (Spearman {rho})")
    axes.set_xlabel("objects in the image")
    axes.set_ylabel("average visual tokens per layer (mean)")
    return _finish(figure, axes, path, title)
