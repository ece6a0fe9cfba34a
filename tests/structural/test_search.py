"""The generator's draws, the live-gradient share, and the budget rules (allocation.py),
each against a plain recomputation of its documented rule."""

from __future__ import annotations

import math

import pytest
import torch

from atp.structural.allocation import greedy_allocation, repair_to_budget, within_budget
from atp.structural.generator import DecisionGenerator, live_gradient_share
from atp.structural.groups import StructureMask, decoder_parameters, layer_costs, layer_groups, mask_parameters
from tests.structural.test_export import tiny_decoder


def test_gumbel_noise_is_one_gumbel_sample_per_entry_and_soft_hard_come_from_the_same_draw():
    config = tiny_decoder("llama").config
    generator = DecisionGenerator(layer_groups(config), seed=3)
    state = generator.noise_rng.get_state()
    sample = generator(noise=True)
    rng = torch.Generator()
    rng.set_state(state)
    for z, soft_a, soft_c, hard_a, hard_c in zip(
        generator.logits(), sample.soft.attention, sample.soft.channels, sample.hard.attention, sample.hard.channels
    ):
        u = torch.rand(z.shape, generator=rng).clamp(1e-6, 1 - 1e-6)
        expected = torch.sigmoid((z + 3.0 - torch.log(-torch.log(u))) / 0.4)
        torch.testing.assert_close(torch.cat([soft_a, soft_c]), expected)
        hard = torch.cat([hard_a, hard_c]).detach()
        # straight-through: value hard (up to rounding of hard + soft - soft), gradient soft
        torch.testing.assert_close(hard[: len(soft_a)], ((soft_a > 0.5) | (soft_a == soft_a.max())).float().detach())
        torch.testing.assert_close(hard[len(soft_a) :], ((soft_c > 0.5) | (soft_c == soft_c.max())).float().detach())
    with pytest.raises(ValueError, match="generator noise must be one of"):
        DecisionGenerator(layer_groups(config), noise="uniform")


def test_the_generator_draws_in_float32_under_bf16_autocast():
    """Mixed-precision training (the SmolLM2 benchmark's bf16 autocast) leaves the mask search in
    float32: the same logits and the same draw as without autocast."""
    generator = DecisionGenerator(layer_groups(tiny_decoder("llama").config), seed=3)
    state = generator.noise_rng.get_state()
    plain = generator(noise=True)
    generator.noise_rng.set_state(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = generator(noise=True)
        logits = generator.logits()
    assert all(z.dtype == torch.float32 for z in logits)
    for a, b in zip(plain.soft.attention + plain.soft.channels, mixed.soft.attention + mixed.soft.channels):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_live_gradient_share_counts_groups_with_s_one_minus_s_over_t_above_threshold():
    soft = StructureMask([torch.tensor([0.5, 0.9999])], [torch.tensor([0.001, 0.3, 1.0, 0.99])])
    values = [0.5, 0.9999, 0.001, 0.3, 1.0, 0.99]
    live = 0
    for s in values:
        if s * (1 - s) / 0.4 > 1e-3:
            live += 1
    assert live_gradient_share(soft, 0.4) == pytest.approx(live / len(values))
    assert live == 4  # 0.9999 and 1.0 are saturated


def brute_force_greedy(priority: StructureMask, config, budget: float) -> list[list[bool]]:
    """The documented rule as plain loops: per-layer top group and channel first, then every
    structure by descending priority (ties: layer, attention first, index) kept if it fits."""
    costs = layer_costs(config)
    entries = []
    for layer, cost in enumerate(costs):
        for i, value in enumerate(priority.attention[layer].tolist()):
            entries.append((value, layer, 0, i, cost.per_group))
        for i, value in enumerate(priority.channels[layer].tolist()):
            entries.append((value, layer, 1, i, cost.per_channel))
    kept = set()
    used = sum(c.fixed for c in costs)
    for layer, cost in enumerate(costs):
        best_a = max(range(len(priority.attention[layer])), key=lambda i: (priority.attention[layer][i], -i))
        best_c = max(range(len(priority.channels[layer])), key=lambda i: (priority.channels[layer][i], -i))
        kept |= {(layer, 0, best_a), (layer, 1, best_c)}
        used += cost.per_group + cost.per_channel
    for value, layer, kind, i, size in sorted(entries, key=lambda e: (-e[0], e[1], e[2], e[3])):
        if (layer, kind, i) not in kept and used + size <= budget:
            kept.add((layer, kind, i))
            used += size
    return sorted(kept)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.5])
def test_greedy_allocation_matches_the_plain_rule_and_meets_the_budget(ratio):
    config = tiny_decoder("llama").config
    groups = layer_groups(config)
    generator = torch.Generator().manual_seed(7)
    priority = StructureMask(
        [torch.randn(g.attention_groups, generator=generator) for g in groups],
        [torch.randn(g.mlp_channels, generator=generator) for g in groups],
    )
    budget = (1 - ratio) * decoder_parameters(config)
    mask = greedy_allocation(priority, config, budget)
    kept = sorted(
        [(layer, 0, i) for layer, m in enumerate(mask.attention) for i in m.nonzero()[:, 0].tolist()]
        + [(layer, 1, i) for layer, m in enumerate(mask.channels) for i in m.nonzero()[:, 0].tolist()]
    )
    assert kept == brute_force_greedy(priority, config, budget)
    kept_params = float(mask_parameters(config, mask))
    assert kept_params <= budget and within_budget(config, mask, budget, 0.01)


def test_repair_keeps_an_in_budget_sample_and_moves_a_missing_one_into_the_budget():
    config = tiny_decoder("llama").config
    groups = layer_groups(config)
    budget = 0.6 * decoder_parameters(config)
    generator = torch.Generator().manual_seed(1)
    logits = [torch.randn(g.attention_groups + g.mlp_channels, generator=generator) for g in groups]
    dense = StructureMask(
        [torch.ones(g.attention_groups, dtype=torch.bool) for g in groups],
        [torch.ones(g.mlp_channels, dtype=torch.bool) for g in groups],
    )
    repaired, changed = repair_to_budget(dense, logits, config, budget)
    assert changed and within_budget(config, repaired, budget) and float(mask_parameters(config, repaired)) <= budget
    # over budget: only the lowest-logit kept structures go (here the sample keeps everything)
    for layer, (heads, channels) in enumerate(zip(repaired.attention, repaired.channels)):
        z = logits[layer][len(heads) :]
        if not bool(channels.all()) and bool(channels.any()):
            assert float(z[channels].min()) >= float(z[~channels].max())
    sparse = StructureMask(
        [torch.tensor([True, False]) for _ in groups], [torch.arange(g.mlp_channels) < 5 for g in groups]
    )
    grown, changed = repair_to_budget(sparse, logits, config, budget)
    assert changed and within_budget(config, grown, budget)
    for small, big in zip(sparse.channels + sparse.attention, grown.channels + grown.attention):
        assert bool((big | ~small).all())  # the under-budget sample's structures all stay
    same, changed = repair_to_budget(repaired, logits, config, budget)
    assert not changed and same is repaired


def test_layer_costs_reproduce_the_parameter_count_of_a_real_layer():
    model = tiny_decoder("llama")
    cost = layer_costs(model.config)[0]
    layer = model.model.layers[0]
    assert cost.per_group * 2 + cost.per_channel * 48 + cost.fixed == sum(p.numel() for p in layer.parameters())
    assert math.isclose(cost.per_channel, 3 * 32)
