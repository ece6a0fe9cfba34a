"""Interleaved latency measurement: round order, pairing, warm-up, restoring, and the warning."""

from __future__ import annotations

import functools
import statistics

import pytest
import torch
from torch.utils.data import DataLoader

import atp
import atp.latency as latency
from atp.data.llava_format import LlavaConversationDataset, collate
from atp.data.processor import build_processor
from atp.data.shapes import vocabulary, write_dataset
from atp.evaluation import evaluate, latency_warnings, markdown_table
from atp.latency import Contender, LatencyRatio, interleaved_prefill_times, latency_ratios
from tests.conftest import tiny_testbed_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("shapes"), {"test": (4, 2, 1)})
    processor = build_processor(vocabulary())
    model = tiny_testbed_model(processor).eval()
    dataset = LlavaConversationDataset(root / "test.json", root / "images", processor, prompt_only=True)
    loader = DataLoader(dataset, batch_size=2, collate_fn=functools.partial(collate, pad_token_id=0))
    return model, processor, loader


def scripted_clock(monkeypatch, seconds_of):
    """Replace the timer: each timed prefill records which pruner is attached and returns
    seconds_of(pruner name or "stock", call index)."""
    calls = []

    def fake(model, batches):
        runtime = getattr(model, "_atp_runtime", None)
        name = runtime.pruner.name if runtime is not None else "stock"
        calls.append(name)
        return seconds_of(name, len(calls) - 1)

    monkeypatch.setattr(latency, "_prefill_seconds", fake)
    return calls


def test_rounds_rotate_skip_warmup_and_restore_each_model(setup, monkeypatch):
    model, _, _ = setup
    fastv = atp.build_pruner("fastv", layer=1, keep_ratio=0.5).eval()
    rand = atp.build_pruner("random", layers=[1], keep_ratio=0.5).eval()
    atp.apply(model, rand)  # attached before: must be attached again after
    calls = scripted_clock(monkeypatch, lambda name, i: float(i))
    contenders = [Contender("a", model, None), Contender("b", model, fastv), Contender("c", model, rand)]
    times = interleaved_prefill_times(contenders, batches=[], repeats=3, warmup=1)
    rounds = [["stock", "fastv", "random"], ["fastv", "random", "stock"], ["random", "stock", "fastv"]]
    rounds.append(rounds[0])  # round 3 rotates back to the start
    assert calls == [name for r in rounds for name in r]
    # call index i took i seconds; the warm-up round (calls 0..2) is not in the times
    expected = {"a": [], "b": [], "c": []}
    label = {"stock": "a", "fastv": "b", "random": "c"}
    for index, name in enumerate(calls):
        if index >= 3:
            expected[label[name]].append(float(index))
    assert times == expected
    assert atp.runtime_of(model).pruner is rand
    atp.remove(model)


def test_ratios_are_paired_round_by_round():
    # a load spike in round 1 slows both contenders threefold: paired ratios stay at 0.5
    pruned, stock = [0.5, 1.5, 0.75], [1.0, 3.0, 1.5]
    ratio = latency_ratios({"pruned": pruned, "stock": stock}, reference="stock")["pruned"]
    assert ratio == LatencyRatio(0.5, 0.5, 0.5, 3)
    assert ratio.warning() is None
    # the unpaired medians would read 0.75 / 1.5 = 0.5 only by luck; a skewed set shows the difference
    ratio = LatencyRatio.from_times([0.4, 0.5, 0.9], [1.0, 1.0, 1.0])
    assert (ratio.median, ratio.low, ratio.high) == (0.5, 0.4, 0.9)
    with pytest.raises(ValueError, match="reference 'base' was not timed"):
        latency_ratios({"stock": stock}, reference="base")


@pytest.mark.parametrize(
    "times,warns",
    [
        ([0.50, 0.52, 0.48], None),  # tight, clearly faster
        ([0.9, 1.2, 1.0], "both sides of 1.0"),  # cannot tell faster from slower
        ([0.3, 0.6, 0.4], "range is 75 % of the median"),  # wide: 0.3 / 0.4
    ],
)
def test_warning_names_the_reason(times, warns):
    ratio = LatencyRatio.from_times(times, [1.0] * len(times))
    if warns is None:
        assert ratio.warning() is None
    else:
        assert warns in ratio.warning()
        spread = (max(times) - min(times)) / statistics.median(times)
        assert ratio.relative_spread == pytest.approx(spread)


def test_a_busy_machine_shows_as_a_warning_in_the_output(setup, monkeypatch):
    """The pruned model is twice as fast, but a load spike hits its timing in the last round:
    the per-round ratios straddle 1.0 and the printed output says so."""
    model, processor, loader = setup
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25).eval())
    # calls: warm-up (fastv 0, stock 1), then (stock 2, fastv 3), (fastv 4, stock 5), (stock 6, fastv 7)
    load = {i: 4.0 if i == 7 else 1.0 for i in range(8)}
    scripted_clock(monkeypatch, lambda name, i: (0.5 if name == "fastv" else 1.0) * load[i])
    result = evaluate(model, processor, loader, "fastv", latency_batches=1, latency_repeats=3)
    atp.remove(model)
    # per-round ratios 0.5, 0.5, 2.0
    assert result.latency_rounds == 3 and result.latency_low == 0.5 and result.latency_high == 2.0
    assert result.latency_ratio == 0.5
    (warning,) = latency_warnings([result])
    assert "fastv" in warning and "both sides of 1.0" in warning
    assert "0.50x (0.50-2.00)" in markdown_table([result])


def test_quiet_machine_no_warning(setup, monkeypatch):
    model, processor, loader = setup
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25).eval())
    scripted_clock(monkeypatch, lambda name, i: 0.5 if name == "fastv" else 1.0)
    result = evaluate(model, processor, loader, "fastv", latency_batches=1, latency_repeats=3)
    atp.remove(model)
    assert (result.latency_ratio, result.latency_low, result.latency_high) == (0.5, 0.5, 0.5)
    assert latency_warnings([result]) == []


def test_real_timing_runs(setup):
    model, processor, loader = setup
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25).eval())
    result = evaluate(model, processor, loader, "fastv", latency_batches=1, latency_repeats=2)
    atp.remove(model)
    assert 0 < result.latency_low <= result.latency_ratio <= result.latency_high and result.latency_rounds == 2
    assert torch.is_tensor(next(model.parameters()))
