"""The analytic cost formula on the Qwen-VL family, against torch's FlopCounterMode on tiny eager models
(GQA with 4 query / 2 key-value heads, MLP width 2x hidden, Qwen3-VL's explicit head_dim), and the
KV bytes of a Qwen2.5-VL-7B-shaped config against a hand count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig

import atp
from atp.metrics import DecoderShape, cost_report, decoder_layer_macs, kv_cache_bytes, prefill_flops
from tests.qwen_inputs import FAMILIES, qwen_batch, qwen_model

SPECS = [(2, [(4, 6)], 3)]  # one prompt: bos + 2 + (start, 6 image tokens, end) + 3 = 14 tokens


def measured_layer_flops(model, batch) -> list[int]:
    """FLOPs FlopCounterMode counts inside each decoder layer of the language model."""
    prefix = f"{type(model).__name__}.model.language_model.layers"
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    counts = counter.get_flop_counts()
    return [sum(counts[f"{prefix}.{i}"].values()) for i in range(model.config.text_config.num_hidden_layers)]


@pytest.mark.parametrize("family", FAMILIES)
def test_formula_equals_flop_counter_on_the_unpruned_model(family):
    model = qwen_model(family, "eager")
    batch = qwen_batch(SPECS)
    n = batch["input_ids"].shape[1]
    shape = DecoderShape.from_config(model.config.text_config)
    assert (shape.heads, shape.kv_heads, shape.mlp, shape.head_dim) == (4, 2, 128, 16)
    assert DecoderShape.from_config(model.config) == shape  # the multimodal config reads its text config
    assert measured_layer_flops(model, batch) == [int(2 * decoder_layer_macs(n, shape))] * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_formula_equals_flop_counter_on_a_dropped_model(family):
    """Drop mode shrinks every later layer's compute by the tokens the stats count."""
    model = qwen_model(family, "eager")
    batch = qwen_batch(SPECS)
    atp.apply(model, atp.build_pruner("random", layers=[1, 3], keep_ratio=[0.5, 0.5], seed=3), mode="drop")
    measured = measured_layer_flops(model, batch)
    stats = atp.stats(model)
    assert stats.tokens[0].tolist() == [14, 11, 11, 10]  # 6 visual -> 3 -> 2
    shape = DecoderShape.from_config(model.config.text_config)
    assert measured == [int(2 * decoder_layer_macs(n, shape)) for n in stats.tokens[0].tolist()]
    assert int(prefill_flops(model.config.text_config, stats.tokens)[0]) == sum(measured)
    report = cost_report(model.config.text_config, stats)
    per_token = 2 * 2 * 16 * 2  # K and V, 2 KV heads, head dim 16, 2 bytes
    assert report.kv_bytes.tolist() == [per_token * (14 + 11 + 11 + 10)]
    assert report.kv_bytes_unpruned.tolist() == [per_token * 14 * 4]


def test_qwen2_5_vl_7b_shape_by_hand():
    """Qwen2.5-VL-7B's language model (hidden 3584, MLP 18944, 28 query / 4 KV heads of 128, 28
    layers): 56 KiB of bf16 KV cache per token, and the per-layer MACs written out by hand."""
    text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
    config = Qwen2_5_VLConfig(text_config=dict(text, num_hidden_layers=28))
    shape = DecoderShape.from_config(config)
    assert shape == DecoderShape(hidden=3584, head_dim=128, heads=28, kv_heads=4, mlp=18944)
    tokens = torch.full((1, 28), 1000)
    assert float(kv_cache_bytes(config.text_config, tokens)[0]) == 1000 * 28 * (2 * 4 * 128 * 2)
    n = 1000
    macs = n * 3584 * 28 * 128 * 2 + n * 3584 * 4 * 128 * 2 + 2 * n * n * 28 * 128 + 3 * n * 3584 * 18944
    assert float(prefill_flops(config.text_config, tokens)[0]) == 2 * 28 * macs
