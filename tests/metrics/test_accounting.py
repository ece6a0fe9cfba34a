"""The analytic cost formula against torch's FlopCounterMode on real (pruned) forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import atp
from atp.metrics import DecoderShape, cost_report, decoder_layer_macs, kv_cache_bytes, prefill_flops
from tests.conftest import make_batch

LAYERS = "LlavaForConditionalGeneration.model.language_model.layers"


def measured_layer_flops(model, batch) -> list[int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    counts = counter.get_flop_counts()
    return [sum(counts[f"{LAYERS}.{i}"].values()) for i in range(model.config.text_config.num_hidden_layers)]


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_formula_equals_flop_counter_on_the_unpruned_model(model_factory, num_kv_heads):
    model = model_factory(attn_implementation="eager", num_kv_heads=num_kv_heads)
    batch = make_batch([(3, 5)])
    n = batch["input_ids"].shape[1]
    shape = DecoderShape.from_config(model.config.text_config)
    expected = 2 * decoder_layer_macs(n, shape)
    assert measured_layer_flops(model, batch) == [int(expected)] * 4


def test_formula_equals_flop_counter_on_a_dropped_model(model_factory):
    """Drop mode really shrinks every later layer's compute by the counted tokens."""
    model = model_factory(attn_implementation="eager")
    batch = make_batch([(3, 5)])
    atp.apply(model, atp.build_pruner("random", layers=[1, 3], keep_ratio=[0.5, 0.25]), mode="drop")
    measured = measured_layer_flops(model, batch)
    stats = atp.stats(model)
    assert stats.tokens[0].tolist() == [25, 17, 17, 11]  # 16 visual -> 8 -> 2 (a quarter of 8)
    shape = DecoderShape.from_config(model.config.text_config)
    assert measured == [int(2 * decoder_layer_macs(n, shape)) for n in stats.tokens[0].tolist()]
    assert int(prefill_flops(model.config.text_config, stats.tokens)[0]) == sum(measured)


def test_cost_report_and_kv_bytes(model_factory):
    model = model_factory()
    config = model.config.text_config
    batch = make_batch([(3, 5), (1, 1)])
    atp.apply(model, atp.build_pruner("random", layers=[2], keep_ratio=0.25), mode="drop")
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    report = cost_report(config, stats, bytes_per_element=2)
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    assert report.kv_bytes.tolist() == [per_token * float(stats.tokens[b].sum()) for b in range(2)]
    assert report.kv_bytes_unpruned.tolist() == [per_token * 4 * float(stats.input_tokens[b]) for b in range(2)]
    expected_ratio = float(report.flops.sum() / report.flops_unpruned.sum())
    assert report.flops_ratio == pytest.approx(expected_ratio) and 0.5 < report.flops_ratio < 1.0
    assert float(kv_cache_bytes(config, stats.tokens).sum()) == float(report.kv_bytes.sum())


@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_pruning_before_the_llm_counts_against_the_unpruned_input(model_factory, mode):
    """A layer-0 pruner (DivPrune): the unpruned reference is every real token of the prompt,
    measured by FlopCounterMode on the stock model, not the already-pruned LLM input."""
    model = model_factory(attn_implementation="eager")
    batch = make_batch([(3, 5)])
    stock = sum(measured_layer_flops(model, batch))
    atp.apply(model, atp.build_pruner("divprune", keep_ratio=0.25), mode=mode)
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    assert stats.input_tokens.tolist() == batch["attention_mask"].sum(1).tolist()
    report = cost_report(model.config.text_config, stats)
    assert float(report.flops_unpruned[0]) == stock
    assert report.flops_ratio < 0.6 and report.kv_ratio == pytest.approx(13 / 25)  # 4 of 16 visual + 9 text
