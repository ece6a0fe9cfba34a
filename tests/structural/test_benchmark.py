"""benchmarks/structural.py reuses each baseline's calibration across ratios and seeds: the masks it
trains with equal `baseline_mask` called afresh for every (method, ratio, seed), and each
calibrated method scores the dense model once."""

from __future__ import annotations

import importlib.util
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
