"""Token budgets: each method really retains the budget, and FitPrune's FLOPs budget equals FastV's."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.budget import KEEP_RATIO_METHODS, KEEP_TOKENS_METHODS, budget_flops_ratio, budget_kwargs, pdrop_schedule
from atp.metrics.accounting import cost_report
from tests.conftest import NUM_VISUAL, make_batch

EQUAL_PROMPTS = [(3, 3)] * 3


def run(model, pruner, batch):
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        model(**batch)
    stats = atp.stats(model)
    atp.remove(model)
    return stats


@pytest.mark.parametrize("name", KEEP_RATIO_METHODS)
@pytest.mark.parametrize("tokens", [8, 4, 2])
def test_single_cut_methods_retain_the_budget(model_factory, name, tokens):
    model = model_factory()
    kwargs = budget_kwargs(name, tokens, NUM_VISUAL, 4)
    if name == "spatial" and tokens != 4:  # a uniform grid on 4 x 4 can keep 16, 4 or 1 tokens
        pytest.skip("spatial keeps whole grid strides only")
    stats = run(model, atp.build_pruner(name, **kwargs), make_batch([(2, 3), (6, 1), (1, 7)]))
    assert stats.visual_tokens[:, -1].tolist() == [tokens] * 3


def test_pdrop_schedule_scales_to_the_depth_and_ends_at_half_the_budget(model_factory):
    assert pdrop_schedule(192, 576, 32) == {"layers": [8, 16, 24], "keep_ratios": [2 / 3, 1 / 3, 1 / 6]}
    model = model_factory(num_layers=8)
    stats = run(model, atp.build_pruner("pdrop", **budget_kwargs("pdrop", 4, NUM_VISUAL, 8)), make_batch(EQUAL_PROMPTS))
    assert stats.visual_tokens[0].tolist() == [16, 16, 8, 8, 4, 4, 2, 2]


def test_fitprune_flops_budget_equals_fastv_measured_flops(model_factory):
    model = model_factory()
    batch = make_batch(EQUAL_PROMPTS)
    stats = run(model, atp.build_pruner("fastv", layer=2, keep_ratio=4 / NUM_VISUAL), batch)
    measured = cost_report(model.config.text_config, stats).flops_ratio
    text = float(stats.input_tokens[0] - NUM_VISUAL)
    assert budget_flops_ratio(4, NUM_VISUAL, text, model.config.text_config) == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("tokens", [0, 17])
def test_budget_outside_the_visual_tokens_is_refused(tokens):
    with pytest.raises(ValueError, match=r"must be in 1\.\.16"):
        budget_kwargs("fastv", tokens, NUM_VISUAL, 4)


def test_unknown_method_has_no_budget_rule():
    with pytest.raises(ValueError, match="no token-budget rule for pruner 'atp'"):
        budget_kwargs("atp", 4, NUM_VISUAL, 4)


def test_visionzip_and_sparsevlm_budgets(model_factory):
    from atp.budget import sparsevlm_schedule

    assert sparsevlm_schedule(64, 576, 32) == {"layers": [2, 6, 15], "keep_tokens": [66, 30, 17]}
    assert sparsevlm_schedule(192, 576, 8) == {"layers": [1, 2, 4], "keep_tokens": [300, 200, 110]}
    with pytest.raises(ValueError, match="schedules for"):
        sparsevlm_schedule(100, 576, 32)
    model = model_factory()
    stats = run(
        model, atp.build_pruner("visionzip", **budget_kwargs("visionzip", 4, NUM_VISUAL, 4)), make_batch(EQUAL_PROMPTS)
    )
    assert stats.visual_tokens[:, 0].tolist() == [4] * 3


def test_keep_tokens_equals_the_matching_keep_ratio(model_factory):
    model = model_factory()
    batch = make_batch([(2, 3), (6, 1), (1, 7)])
    for name, by_ratio, by_count in [
        ("fastv", dict(keep_ratio=0.25), dict(keep_tokens=4)),
        ("fastervlm", dict(keep_ratio=0.25), dict(keep_tokens=4)),
        ("divprune", dict(keep_ratio=0.25), dict(keep_tokens=4)),
        ("spatial", dict(keep_ratio=0.25), dict(keep_tokens=4)),
        ("pdrop", dict(layers=[1, 2], keep_ratios=[0.5, 0.25]), dict(layers=[1, 2], keep_tokens=[8, 4])),
    ]:
        ratio = run(model, atp.build_pruner(name, **by_ratio), batch).kept
        count = run(model, atp.build_pruner(name, **by_count), batch).kept
        assert {k: [t.tolist() for t in v] for k, v in ratio.items()} == {
            k: [t.tolist() for t in v] for k, v in count.items()
        }, name
    atp.apply(model, atp.build_pruner("fastv", keep_tokens=17))
    with pytest.raises(ValueError, match="keep_tokens=17 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**batch)


@pytest.mark.parametrize("name", KEEP_TOKENS_METHODS)
@pytest.mark.parametrize("tokens", [8, 4, 2])
def test_keep_tokens_methods_retain_the_budget(model_factory, name, tokens):
    model = model_factory()
    kwargs = budget_kwargs(name, tokens, NUM_VISUAL, 4, vision_layers=2)  # the tiny tower's depth
    assert kwargs["keep_tokens"] == tokens
    stats = run(model, atp.build_pruner(name, **kwargs), make_batch([(2, 3), (6, 1), (1, 7)]))
    assert stats.visual_tokens[:, -1].tolist() == [tokens] * 3


def test_vision_layers_scale_from_clip_l_to_the_tower():
    assert budget_kwargs("vtc_cls", 64, 576, 32, vision_layers=24) == {"keep_tokens": 64}  # the reference's
    assert budget_kwargs("vtc_cls", 64, 576, 32, vision_layers=12)["start_layer"] == 8
    assert budget_kwargs("vtc_cls", 64, 576, 32, vision_layers=2)["start_layer"] == 0  # only layer 0 = depth - 2
    assert budget_kwargs("hiprune", 64, 576, 32, vision_layers=12)["object_layer"] == 5  # int(4.5 + 0.5)
    assert budget_kwargs("hiprune", 64, 576, 32, vision_layers=2)["object_layer"] == 1
    assert budget_kwargs("vispruner", 64, 576, 32, vision_layers=2) == {"keep_tokens": 64}


def test_vflowopt_budget_scales_the_official_stages_and_box():
    from atp.budget import vflowopt_budget

    official = vflowopt_budget(144, 576, 28)
    assert official["layers"] == [0, 9, 18] and official["target"] == 0.25
    assert official["space"]["keep_ratios"] == [[0.25, 0.375], [0.2 / 0.375, 1.0]]  # the official box at 0.25
    llava = vflowopt_budget(64, 576, 32)
    assert llava["layers"] == [0, 10, 21] and llava["target"] == pytest.approx(64 / 576)
    assert llava["space"]["keep_ratios"][0] == pytest.approx([64 / 576, 96 / 576])
    assert vflowopt_budget(4, 16, 3)["layers"] == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 3 decoder layers"):
        vflowopt_budget(4, 16, 2)
    with pytest.raises(ValueError, match=r"must be in 1\.\.16"):
        vflowopt_budget(17, 16, 8)
