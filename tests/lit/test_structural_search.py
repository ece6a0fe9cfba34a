"""ATP's search on a tiny GQA Llama: the generator's CE is the soft-mask CE (against a stock HF
forward with the soft masks folded into the weights), its learning-rate curve is the documented
schedule, the frozen mask meets the budget, and the search curves are logged."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from atp.lit.structural import StructuralPruningModule
from atp.structural.allocation import within_budget
from tests.lit.test_structural import token_batches
from tests.structural.test_export import tiny_decoder


def fit(module: StructuralPruningModule, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **trainer_args
    )
    trainer.fit(module, train_dataloaders={"train": token_batches(0), "held_out": token_batches(1)})
    return trainer


@torch.no_grad()
def folded_ce(soft_attention, soft_channels, batch: dict) -> float:
    """CE of the stock HF model with v_proj / up_proj rows scaled by the soft masks (LoRA B is
    zero at the start, so this is the generator step's masked forward written another way)."""
    model = tiny_decoder("llama")
    for layer, heads, channels in zip(model.model.layers, soft_attention, soft_channels):
        layer.self_attn.v_proj.weight.mul_(heads.repeat_interleave(8)[:, None])
        layer.mlp.up_proj.weight.mul_(channels[:, None])
    return float(model(**batch).loss)


def test_generator_cross_entropy_uses_the_soft_masks():
    torch.manual_seed(0)
    module = StructuralPruningModule(tiny_decoder("llama"), prune_ratio=0.4, lora_rank=4, control_epochs=1)
    module.generator.offset = 0.0  # soft masks near 0.5: far from the hard ones, so the two CEs differ
    state = module.generator.noise_rng.get_state()
    with torch.no_grad():
        sample = module.generator(noise=True)
    module.generator.noise_rng.set_state(state)  # the generator step draws the same noise
    batch = next(iter(token_batches(1)))
    soft = folded_ce(sample.soft.attention, sample.soft.channels, batch)
    hard = folded_ce(sample.hard.attention, sample.hard.channels, batch)
    fit(module, max_steps=1)
    logged = module.search_log[0]["generator/ce"]
    assert logged == pytest.approx(soft, rel=1e-5)
    assert abs(soft - hard) > 100 * 1e-5 * soft  # the test tells soft from hard


def expected_factor(step: int, control: int, per_epoch: int, lr: float, min_lr: float) -> float:
    cosine = min_lr / lr + (1 - min_lr / lr) * (1 + math.cos(math.pi * step / control)) / 2
    return cosine * (0.2 if step >= control - per_epoch / 3 else 1.0)


def test_search_logs_curves_follows_the_schedule_and_freezes_a_mask_within_the_budget():
    torch.manual_seed(0)
    module = StructuralPruningModule(
        tiny_decoder("llama"),
        prune_ratio=0.4,
        control_epochs=2,
        generator_lr=1e-3,
        lora_lr=1e-3,
        lora_rank=4,
        lasso_eta=0.05,
    )
    fit(module, max_epochs=3)
    log = module.search_log
    assert len(log) == 2 * 4 == int(module.generator_steps)  # 4 batches per epoch, 2 control epochs
    for step, record in enumerate(log):
        assert record["generator/lr"] == pytest.approx(1e-3 * expected_factor(step, 8, 4, 1e-3, 1e-6), rel=1e-6)
        assert 0.0 <= record["generator/live_share"] <= 1.0 and 0.0 < record["generator/keep_ratio"] <= 1.0
    assert bool(module.is_frozen)
    mask = module.current_mask()
    assert within_budget(module.config, mask, module.budget, 0.01)
    assert float(module.keep_ratio(mask)) == pytest.approx(0.6, rel=0.01)


def test_lora_steps_during_the_search_use_fresh_samples_not_the_deterministic_mask():
    torch.manual_seed(0)
    module = StructuralPruningModule(tiny_decoder("llama"), prune_ratio=0.4, lora_rank=4, control_epochs=1)
    module.generator.offset = 0.0  # soft masks near 0.5: every draw differs
    with torch.no_grad():
        deterministic = torch.cat(
            [torch.cat([a, c]) for a, c in zip(*vars(module.generator(noise=False).hard).values())]
        )
    used, original = [], module.masker.set

    def record(mask, mode="full"):
        if mode == "frozen":
            used.append(torch.cat([torch.cat([a, c]) for a, c in zip(mask.attention, mask.channels)]).float())
        original(mask, mode)

    module.masker.set = record
    fit(module, max_steps=6)  # Lightning counts optimizer steps: a generator and a LoRA step per batch
    assert len(used) == 3
    assert all(not torch.equal(mask, deterministic.detach().round()) for mask in used)
    assert not torch.equal(used[0], used[1]) and not torch.equal(used[1], used[2])
    assert torch.equal(used[-1].bool(), module.sample_flat)  # the last LoRA step used the stored last sample
