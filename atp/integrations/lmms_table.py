"""Merge lmms-eval runs of the atp model into the `make budgets` table (`atp.evaluation.markdown_table`).

A run folder holds lmms-eval's `<time>_results.json` and the plugin's `atp_accounting_<time>.json`
(`atp.integrations.lmms_eval`). One row per run: each benchmark's headline score as a fraction
(its metric and scale in `HEADLINE`), their mean as the row's accuracy, and the accounting
averaged over the benchmarks (each benchmark weighs the same, as the average score does; the
latency ratio: the median of the benchmarks' ratios). Retention: the row's average / the
unpruned row's. Runs without lmms-eval installed (reads JSON only).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from atp.evaluation import EvaluationResult

# task -> (metric in lmms-eval's results, factor to a fraction in [0, 1])
HEADLINE: dict[str, tuple[str, float]] = {
    "gqa": ("exact_match", 1.0),
    "mmbench_en_dev": ("gpt_eval_score", 0.01),
    "mmbench_en_dev_static": ("gpt_eval_score", 0.01),
    "mme": ("mme_perception_score", 1 / 2000),  # perception, out of 2000 (LLaVA-1.5-7B: 1510.7)
    "pope": ("pope_f1_score", 1.0),
    "scienceqa_img": ("exact_match", 1.0),
    "seedbench": ("seed_image", 1.0),
    "textvqa_val": ("exact_match", 1.0),
    "vqav2_val": ("exact_match", 1.0),
    "shapesvqa": ("exact_match", 1.0),
    "pope_shapes": ("pope_accuracy", 1.0),
}


def newest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern), key=lambda p: p.name)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {folder}: did the lmms-eval run finish (and write its results)?")
    return found[-1]


def headline(task: str, metrics: dict) -> float:
    """The task's headline score as a fraction; a clear error when the task has no known headline."""
    if task in HEADLINE:
        name, scale = HEADLINE[task]
    else:
        raise ValueError(
            f"no headline metric known for task {task!r}; add it to HEADLINE in atp/integrations/lmms_table.py "
            f"(its metrics: {sorted(k.split(',')[0] for k in metrics if not k.startswith('alias'))})."
        )
    key = f"{name},none"
    if key not in metrics:
        raise ValueError(f"task {task!r} reported no {name!r} (metrics: {sorted(metrics)}).")
    return float(metrics[key]) * scale


def run_row(folder: str | Path, budget: int | None = None) -> tuple[int | None, EvaluationResult]:
    """(budget, one table row) from a run folder."""
    folder = Path(folder)
    content = json.loads(newest(folder, "*_results.json").read_text())
    groups = {name for name, subtasks in content.get("group_subtasks", {}).items() if subtasks}
    results = {task: metrics for task, metrics in content["results"].items() if task not in groups}
    accounting = json.loads(newest(folder, "atp_accounting_*.json").read_text())
    tasks = accounting["tasks"]
    missing = sorted(set(results) - set(tasks))
    if missing:
        raise ValueError(f"{folder}: the accounting has no entry for task(s) {missing}; was the run cut short?")
    scores = {task: headline(task, metrics) for task, metrics in sorted(results.items())}

    def mean(key: str) -> float:
        return statistics.fmean(tasks[t][key] for t in scores)

    latencies = [tasks[t]["latency_ratio"] for t in scores if tasks[t]["latency_ratio"] is not None]
    spec = accounting["atp"]
    row = EvaluationResult(
        method=spec["method"],
        accuracy=statistics.fmean(scores.values()),
        accuracy_by_type=scores,
        avg_visual_tokens=mean("avg_visual_tokens"),
        input_visual_tokens=mean("input_visual_tokens"),
        flops_ratio=mean("flops_ratio"),
        kv_ratio=mean("kv_ratio"),
        latency_ratio=statistics.median(latencies) if latencies else None,
        spearman_tokens_objects=None,
        num_samples=sum(tasks[t]["num_samples"] for t in scores),
    )
    return (budget if budget is not None else spec.get("budget_tokens")), row


def merge(folders: list[Path]) -> tuple[list[EvaluationResult], list[str]]:
    """Rows sorted as `benchmarks/collect_results.py` sorts them (budget, largest first; unpruned
    first) and the retention lines against the unpruned row."""
    found = [run_row(folder) for folder in folders]
    found.sort(key=lambda item: (-(item[0] or 10**9), item[1].method != "unpruned", item[1].method))
    rows = [row for _, row in found]
    unpruned = next((row for row in rows if row.method == "unpruned"), None)
    lines = []
    if unpruned is not None:
        lines = [f"- {r.method}: retention {100 * r.accuracy / max(unpruned.accuracy, 1e-9):.1f} %" for r in rows]
    return rows, lines
