"""The pictures draw exactly the numbers of the tables they illustrate, as valid PNG files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from atp.evaluation import EvaluationResult, markdown_table
from atp.plots import method_family, plot_kept_tokens_per_layer, plot_pareto, plot_tokens_vs_objects

ROOT = Path(__file__).resolve().parents[1]


def result(method: str, accuracy: float, tokens: float, flops: float, **extra) -> EvaluationResult:
    return EvaluationResult(
        method=method,
        accuracy=accuracy,
        accuracy_by_type={},
        avg_visual_tokens=tokens,
        input_visual_tokens=576.0,
        flops_ratio=flops,
        kv_ratio=flops,
        latency_ratio=None,
        spearman_tokens_objects=None,
        num_samples=10,
        **extra,
    )


SWEEP = {  # budget -> {method: (accuracy, avg tokens per layer, FLOPs ratio)}
    192: {"fastv": (0.81, 205.3, 0.412), "random": (0.62, 201.0, 0.401)},
    128: {"fastv": (0.74, 141.7, 0.297), "random": (0.55, 137.2, 0.288)},
    64: {"fastv": (0.52, 77.9, 0.183), "random": (0.41, 73.4, 0.171)},
}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def flat(points: list[tuple[float, float]]) -> list[float]:
    return [value for point in points for value in point]


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_pareto_plot_from_collect_results_draws_the_table(tmp_path):
    """make budgets' last step: results.json files -> table.md and pareto.png; each method's
    line passes through its rows' (tokens, accuracy) and (FLOPs, accuracy) in the table."""
    sweep = tmp_path / "budgets"
    runs = [(None, result("unpruned", 0.86, 576.0, 1.0))]
    runs += [(b, result(f"{m} @ {b} tokens", *v)) for b, row in SWEEP.items() for m, v in row.items()]
    for index, (budget, r) in enumerate(runs):
        folder = sweep / str(index)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({**r.as_dict(), "budget_tokens": budget}))
    command = [sys.executable, str(ROOT / "benchmarks/collect_results.py"), str(sweep), "--out", str(tmp_path / "t.md")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's atp, whatever the venv has installed
    subprocess.run(
        [*command, "--plot", str(tmp_path / "pareto.png")], check=True, cwd=ROOT, capture_output=True, env=env
    )
    assert_png(tmp_path / "pareto.png")

    rows = table_rows((tmp_path / "t.md").read_text())
    series = plot_pareto([r for _, r in runs], tmp_path / "again.png")
    assert_png(tmp_path / "again.png")
    for axis, column in (("tokens", "avg visual tokens/layer"), ("flops", "FLOPs")):
        assert sorted(series[axis]) == ["fastv", "random", "unpruned"]
        for family in ("fastv", "random"):
            from_table = sorted(
                (float(row[column].rstrip(" %")), float(row["accuracy"]))
                for method, row in rows.items()
                if method_family(method) == family
            )
            assert len(series[axis][family]) == 3
            assert flat(series[axis][family]) == pytest.approx(flat(from_table), abs=0.051)  # table: 0.1 steps
        unpruned = rows["unpruned"]
        assert flat(series[axis]["unpruned"]) == pytest.approx(
            [float(unpruned[column].rstrip(" %")), float(unpruned["accuracy"])], abs=0.051
        )


def test_kept_tokens_per_layer_follow_the_pruners_rule(tmp_path):
    """FastV keeping 25 % before layer 1 of 4: 576 visual tokens in layer 0, 144 after (the
    documented rule), as evaluate() records them and as the plot draws them."""
    import functools

    from torch.utils.data import DataLoader

    import atp
    from atp.data.llava_format import LlavaConversationDataset, collate
    from atp.data.processor import build_processor
    from atp.data.shapes import vocabulary, write_dataset
    from atp.evaluation import evaluate
    from tests.conftest import tiny_testbed_model

    root = write_dataset(tmp_path / "shapes", {"test": (4, 2, 1)})
    processor = build_processor(vocabulary())
    model = tiny_testbed_model(processor).eval()
    dataset = LlavaConversationDataset(root / "test.json", root / "images", processor, prompt_only=True)
    loader = DataLoader(dataset, batch_size=2, collate_fn=functools.partial(collate, pad_token_id=0))
    unpruned = evaluate(model, processor, loader, "unpruned")
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25).eval())
    fastv = evaluate(model, processor, loader, "fastv", latency_batches=0)
    atp.remove(model)
    assert unpruned.visual_tokens_per_layer == [576.0] * 4
    assert fastv.visual_tokens_per_layer == [576.0, 144.0, 144.0, 144.0]
    assert sum(fastv.visual_tokens_per_layer) / 4 == pytest.approx(fastv.avg_visual_tokens)
    series = plot_kept_tokens_per_layer([unpruned, fastv], tmp_path / "layers.png")
    assert_png(tmp_path / "layers.png")
    assert series == {
        "unpruned": [(float(i), 576.0) for i in range(4)],
        "fastv": [(0.0, 576.0)] + [(i, 144.0) for i in (1.0, 2.0, 3.0)],
    }
    with pytest.raises(ValueError, match="has no visual_tokens_per_layer"):
        plot_kept_tokens_per_layer([result("old", 0.5, 100.0, 0.5)], tmp_path / "old.png")


def test_tokens_versus_objects_are_group_means(tmp_path):
    samples = [(1, 40.0), (3, 90.0), (1, 50.0), (2, 70.0), (3, 110.0), (1, 60.0)]  # (objects, tokens)
    per_sample = [{"num_objects": n, "avg_visual_tokens": t} for n, t in samples]
    atp_row = result("atp", 0.8, 70.0, 0.3, per_sample=per_sample)
    atp_row.spearman_tokens_objects = 0.93
    flat = result(
        "fastv", 0.7, 70.0, 0.3, per_sample=[{"num_objects": n, "avg_visual_tokens": 70.0} for n, _ in samples]
    )
    series = plot_tokens_vs_objects([atp_row, flat], tmp_path / "objects.png")
    assert_png(tmp_path / "objects.png")
    expected = []
    for count in sorted({n for n, _ in samples}):
        tokens = [t for n, t in samples if n == count]
        expected.append((float(count), sum(tokens) / len(tokens)))
    assert series["atp (Spearman 0.93)"] == expected == [(1.0, 50.0), (2.0, 70.0), (3.0, 100.0)]
    assert series["fastv (Spearman -)"] == [(1.0, 70.0), (2.0, 70.0), (3.0, 70.0)]
    assert "| atp | 80.0 |" in markdown_table([atp_row])
