"""benchmarks/structural.py: each baseline's calibration is reused across ratios and seeds (the masks it
trains with equal `baseline_mask` called afresh for every (method, ratio, seed), and each calibrated
method scores the dense model once); perplexity; and the split of the methods over worker processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from atp.models.causal import tiny_causal_lm
from atp.structural.baselines import METHODS, baseline_mask

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("structural_benchmark", ROOT / "benchmarks/structural.py")
benchmark = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = benchmark
spec.loader.exec_module(benchmark)


def test_calibration_is_computed_once_per_method_and_gives_the_fresh_masks(monkeypatch):
    torch.manual_seed(0)
    dense = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=2).eval()
    datamodule = Namespace(chunks={"train": torch.randint(0, 64, (24, 16))})  # what fixed_mask reads
    args = Namespace(calibration_chunks=16)
    chunks = datamodule.chunks["train"][:16]
    calibration = [{"input_ids": chunks[i : i + 8]} for i in range(0, 16, 8)]
    calls = []
    scores = benchmark.baseline_scores
    monkeypatch.setattr(benchmark, "baseline_scores", lambda *a, **k: calls.append(a[1]) or scores(*a, **k))
    cache: dict = {}
    for ratio in (0.2, 0.5):
        for seed in (0, 1):
            for method in METHODS:
                got = benchmark.fixed_mask(args, dense, method, ratio, seed, datamodule, cache)
                expected = baseline_mask(dense, method, ratio, calibration, seed=seed)
                for a, b in zip(got.attention + got.channels, expected.attention + expected.channels):
                    assert torch.equal(a, b), (method, ratio, seed)
            assert benchmark.fixed_mask(args, dense, "atp", ratio, seed, datamodule, cache) is None
    assert sorted(calls) == sorted([m for m in METHODS if m != "random"] + ["random", "random"])


@pytest.mark.parametrize("bf16", [False, True])
def test_perplexity_is_the_exponent_of_the_mean_token_loss(bf16):
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32, num_layers=1).eval()
    chunks = torch.randint(0, 64, (5, 9))
    losses = []
    for row in chunks:  # plain loop: -log p(next token) at every position of every chunk
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=row[None]).logits[0].float()
        log_probs = logits.log_softmax(-1)
        losses.append(sum(-float(log_probs[t, row[t + 1]]) for t in range(len(row) - 1)) / (len(row) - 1))
    expected = torch.tensor(losses).mean().exp()
    assert benchmark.perplexity(model, chunks, 2, bf16) == pytest.approx(float(expected), rel=1e-2 if bf16 else 1e-5)


def test_methods_split_into_groups_of_about_equal_cost_each_method_once():
    methods = ["atp", "flap", "llm_pruner", "wanda_sp", "wanda_sp_global", "magnitude", "random"]
    groups = benchmark.split_methods(methods, 2)
    assert sorted(m for group in groups for m in group) == sorted(methods)
    costs = [sum(benchmark.METHOD_COST.get(m, 1.0) for m in group) for group in groups]
    assert max(costs) - min(costs) <= 1.0  # no move of one method between the groups would balance them better
    assert benchmark.split_methods(["flap"], 4) == [["flap"]]


def test_two_worker_processes_give_the_runs_of_one_process(tmp_path):
    """The same records (masks, training, perplexities) whether the methods run here or split over two
    worker processes of one thread each (up to float summation order across thread counts)."""
    argv = ["--tiny", "--steps", "2", "--epochs", "2", "--control-epochs", "1", "--eval-tokens", "512"]
    argv += ["--ratios", "0.3", "--methods", "atp", "random", "--general-chunks", "4", "--repeats", "1"]
    out = tmp_path / "records.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/structural.py"), *argv, "--workers", "2", "--records", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    split = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(split) == {"atp", "random"}
    args = benchmark.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = {r["method"]: r for r in benchmark.run_methods(args, args.methods)}
    finally:
        torch.set_num_threads(threads)
    for method, record in here.items():
        assert split[method]["params"] == record["params"]
        for key in ("domain", "general", "keep"):
            assert split[method][key] == pytest.approx(record[key], rel=1e-4), (method, key)
