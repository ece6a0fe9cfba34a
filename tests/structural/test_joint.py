"""Joint pruning: a VLM whose language model was structurally pruned (per-layer key/value heads
and MLP widths, exported and loaded back) runs in the token-pruning runtime."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

import atp
from atp.metrics import DecoderShape, cost_report, decoder_layer_macs
from atp.structural import StructureMask, decoder_parameters, layer_groups, mask_structures, remove_structures
from atp.structural.allocation import within_budget
from atp.structural.baselines import baseline_mask, input_statistics
from tests.conftest import make_batch, single
from tests.runtime.test_drop_vs_mask import kept_positions
from tests.token.test_fastv import brute_force_fastv

RAGGED = [(2, 3), (6, 1), (1, 7)]
LAYERS = "LlavaForConditionalGeneration.model.language_model.layers"


def uneven_mask(config, seed: int = 0) -> StructureMask:
    """Every layer keeps a different share of its attention groups and MLP channels (at least one of each)."""
    generator = torch.Generator().manual_seed(seed)
    attention, channels = [], []
    for index, groups in enumerate(layer_groups(config)):
        heads = torch.zeros(groups.attention_groups, dtype=torch.bool)
        count = 1 + index % groups.attention_groups
        heads[torch.randperm(groups.attention_groups, generator=generator)[:count]] = True
        width = groups.mlp_channels * (index + 1) // (len(layer_groups(config)) + 1)
        kept = torch.zeros(groups.mlp_channels, dtype=torch.bool)
        kept[torch.randperm(groups.mlp_channels, generator=generator)[:width]] = True
        attention.append(heads)
        channels.append(kept)
    return StructureMask(attention, channels)


@pytest.fixture(params=["llama", "qwen2"])
def joint(request, model_factory, tmp_path):
    """(masked-reference logits, the structurally pruned VLM loaded back from disk, its mask, a batch)."""
    model = model_factory(text=request.param, attn_implementation="eager", num_heads=4, num_kv_heads=2)
    batch = make_batch(RAGGED, seed=2)
    mask = uneven_mask(model.config)
    masker = mask_structures(model, mask)
    with torch.no_grad():
        masked = model(**batch).logits
    masker.remove()
    remove_structures(model, mask).save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return masked, loaded, mask, batch


def test_the_pruned_vlm_equals_the_masked_one_after_a_round_trip_through_disk(joint):
    masked, loaded, mask, batch = joint
    text = loaded.config.text_config
    assert text.model_type.startswith("atp_pruned_")
    assert text.kv_heads_per_layer == [int(h.sum()) for h in mask.attention] == [1, 2, 1, 2]
    assert text.intermediate_size_per_layer == [int(c.sum()) for c in mask.channels] == [25, 51, 76, 102]
    layer = loaded.model.language_model.layers[0]
    assert layer.self_attn.k_proj.out_features == 16 and layer.mlp.up_proj.out_features == 25
    with torch.no_grad():
        assert_close(loaded(**batch).logits, masked, rtol=1e-4, atol=1e-5)


def test_fastv_keeps_what_brute_force_keeps_on_the_pruned_llm(joint):
    _, model, _, batch = joint
    reference = brute_force_fastv(model, batch, layer=2, keep_ratio=0.25)
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        atp.apply(model, atp.build_pruner("fastv", layer=2, keep_ratio=0.25), mode="drop")
        with torch.no_grad():
            model(**batch)
        kept = atp.stats(model).kept[2]
        atp.remove(model)
        for b, expected in enumerate(reference):
            assert torch.equal(kept[b], expected), (attn, b)


@pytest.mark.parametrize("method", ["random", "fastv", "atp"])
def test_drop_equals_mask_and_generate_is_exact_on_the_pruned_llm(joint, method):
    """Drop equals mask at every kept position; greedy generate is identical across modes (and,
    for `random`, whose choice does not depend on the prompt's last token, with the cache off)."""
    _, model, _, batch = joint
    model.set_attn_implementation("sdpa")
    kwargs = {
        "random": dict(layers=[1, 3], keep_ratio=[0.5, 0.5], seed=3),
        "fastv": dict(layer=2, keep_ratio=0.5),
        "atp": dict(num_layers=4),
    }[method]
    torch.manual_seed(0)
    pruner = atp.build_pruner(method, **kwargs)
    if method == "atp":  # thresholds in the middle of the score range, so that the modules prune
        with torch.no_grad():
            for module in pruner.modules_by_layer.values():
                module.redundancy_head.bias.fill_(0.0)
                module.spatial_head.bias.fill_(0.6)
        pruner.eval()
    logits, stats, generated = {}, {}, {}
    caches = (True, False) if method == "random" else (True,)
    for mode in ("drop", "mask"):
        atp.apply(model, pruner, mode=mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits
        stats[mode] = atp.stats(model)
        for use_cache in caches:
            generated[mode, use_cache] = model.generate(
                **batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache
            )
        atp.remove(model)
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    assert int(stats["drop"].visual_tokens[:, -1].max()) < 16  # the token pruner really pruned
    keep = kept_positions(batch, stats["drop"], 4)
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)
    for key, ids in generated.items():
        assert torch.equal(ids, generated["drop", True]), key


def test_accounting_counts_each_layers_own_width(joint):
    """cost_report's FLOPs equal torch's FlopCounterMode per layer, the per-layer widths included."""
    _, model, _, batch = joint
    sample = single(batch, 1)
    atp.apply(model, atp.build_pruner("random", layers=[1, 3], keep_ratio=[0.5, 0.25]), mode="drop")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**sample)
    stats = atp.stats(model)
    counts = counter.get_flop_counts()
    measured = [sum(counts[f"{LAYERS}.{i}"].values()) for i in range(4)]
    text = model.config.text_config
    dense = DecoderShape.from_config(text)
    tokens = stats.tokens[0].tolist()
    assert tokens == [24, 16, 16, 10]  # 8 text tokens; 16 visual -> 8 -> 2
    for layer, (kv_heads, width) in enumerate(zip(text.kv_heads_per_layer, text.intermediate_size_per_layer)):
        shape = DecoderShape(dense.hidden, dense.head_dim, 2 * kv_heads, kv_heads, width)  # 2 queries per group
        assert measured[layer] == int(2 * decoder_layer_macs(tokens[layer], shape)), layer
    report = cost_report(model.config, stats)
    assert float(report.flops[0]) == sum(measured)
    per_token = [2 * kv * dense.head_dim * 2 for kv in text.kv_heads_per_layer]  # K and V, 2 bytes
    assert float(report.kv_bytes[0]) == sum(n * b for n, b in zip(tokens, per_token))


def test_calibrated_baselines_read_the_vlms_image_prompts(model_factory):
    """A two-stage baseline calibrates on the VLM's own prompts (visual tokens included) and meets its budget."""
    model = model_factory(num_heads=4, num_kv_heads=2)
    batch = make_batch(RAGGED, seed=2)
    statistics = input_statistics(model, [batch])
    assert all(int(layer["o"]["n"]) == batch["input_ids"].numel() for layer in statistics)  # 3 x 31 tokens
    for method in ("wanda_sp", "flap", "llm_pruner"):
        mask = baseline_mask(model, method, 0.3, calibration=[batch])
        budget = 0.7 * decoder_parameters(model.config)
        assert within_budget(model.config, mask, budget), method
        assert len(mask.attention) == 4 and mask.channels[0].shape == (128,)
