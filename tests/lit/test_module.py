"""The LightningModule's trainable parts: frozen model, LoRA through peft, merge for export."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from transformers import LlavaForConditionalGeneration

import atp
from atp.lit.module import VLMTrainingModule
from atp.token.atp import ATPPruner
from tests.conftest import make_batch


def test_pruner_only_training_freezes_the_model(model_factory):
    module = VLMTrainingModule(model_factory(), ATPPruner(num_layers=4, hidden=8), train_parts="pruner")
    assert not any(p.requires_grad for p in module.model.parameters())
    assert all(p.requires_grad for p in module.pruner.parameters())


def test_lora_trains_adapters_and_merges_into_a_stock_model(model_factory):
    model = model_factory()
    module = VLMTrainingModule(model, ATPPruner(num_layers=4, hidden=8), train_parts="lora", lora_rank=4)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert len(trainable) == 4 * 7 * 2  # 4 layers x 7 projections x (A, B)
    with torch.no_grad():  # move the adapters off their zero init so the merge matters
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
        batch = make_batch([(2, 3)])
        before = module.model(**batch).logits
        merged = module.merged_model()
        after = merged(**batch).logits
    assert type(merged) is LlavaForConditionalGeneration
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert_close(after, before, rtol=1e-4, atol=1e-5)
    atp.apply(merged, atp.build_pruner("fastv", layer=1, keep_ratio=0.5))  # the runtime takes the merged model


def test_language_model_training_freezes_the_vision_side(model_factory):
    module = VLMTrainingModule(model_factory(), None, train_parts="language_model")
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_tower" in n or "multi_modal_projector" in n for n in frozen)
    assert all(p.requires_grad for n, p in module.model.named_parameters() if "language_model" in n or "lm_head" in n)


def test_llava_stage_two_freezes_only_the_vision_tower(model_factory):
    module = VLMTrainingModule(model_factory(), None, train_parts="projector_and_language_model")
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in module.model.named_parameters() if "vision_tower" in n}
    assert any("multi_modal_projector" in n for n, p in module.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(("target", "start"), [(0.25, 1.0), (4.0, 16.0)])  # a fraction, or a count of the 16
def test_target_warmup_eases_the_budget_in_from_every_token(model_factory, target, start):
    pruner = ATPPruner(num_layers=4, hidden=8)
    module = VLMTrainingModule(model_factory(), pruner, target_tokens=target, target_warmup=0.4)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=0)  # warm-up: the first 4 steps
    schedule = []
    for step in range(7):
        module._trainer.global_step = step
        schedule.append(module.scheduled_target())
    assert schedule == pytest.approx([start - min(1.0, step / 4) * (start - target) for step in range(7)])
    assert VLMTrainingModule(model_factory(), pruner, target_tokens=target).scheduled_target() == target
    with pytest.raises(ValueError, match=r"target_warmup=1.0 is outside \[0, 1\)"):
        VLMTrainingModule(model_factory(), pruner, target_warmup=1.0)


def test_pruner_betas_reach_only_the_pruner_group(model_factory):
    pruner = ATPPruner(num_layers=4, hidden=8)
    module = VLMTrainingModule(model_factory(), pruner, train_parts="lora", pruner_betas=[0.9, 0.95])
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    model_group, pruner_group = optimizer.param_groups
    assert pruner_group["betas"] == (0.9, 0.95) and model_group["betas"] == (0.9, 0.999)
    assert {id(p) for p in pruner_group["params"]} == {id(p) for p in pruner.parameters()}
    with pytest.raises(ValueError, match=r"pruner_betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"):
        VLMTrainingModule(model_factory(), pruner, pruner_betas=[0.9, 1.0])


def test_budget_offsets_get_their_own_learning_rate(model_factory):
    pruner = ATPPruner(num_layers=4, layers=[1, 3], hidden=8, budget_gradients="offset")
    module = VLMTrainingModule(model_factory(), pruner, train_parts="pruner", pruner_lr=1e-3, budget_offset_lr=0.1)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    mlp_group, offset_group = module.configure_optimizers()["optimizer"].param_groups
    offsets = [pruner.modules_by_layer[layer].budget_offset for layer in ("1", "3")]
    assert {id(p) for p in offset_group["params"]} == {id(p) for p in offsets} and offset_group["lr"] == 0.1
    assert len(mlp_group["params"]) + 2 == len(list(pruner.parameters())) and mlp_group["lr"] == 1e-3
    default = VLMTrainingModule(model_factory(), pruner, train_parts="pruner", pruner_lr=1e-3)
    default._trainer = SimpleNamespace(estimated_stepping_batches=10)
    assert [group["lr"] for group in default.configure_optimizers()["optimizer"].param_groups] == [1e-3, 1e-3]
    with pytest.raises(ValueError, match=r"budget_offset_lr=0.0 must be positive \(or null: pruner_lr\)"):
        VLMTrainingModule(model_factory(), pruner, budget_offset_lr=0.0)


def hard_finetune_module(model_factory, straight_through: bool = False, **kwargs) -> VLMTrainingModule:
    """LoRA (moved off its zero init) and ATP modules before layers 1 and 3 whose thresholds sit
    inside the scores, so that tokens drop; the same weights for every call."""
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], hidden=8, straight_through=straight_through)
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.0)
            module.spatial_head.bias.fill_(0.3)
    module = VLMTrainingModule(model_factory(), pruner, train_parts="lora", lora_rank=4, **kwargs)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    module._trainer = SimpleNamespace(estimated_stepping_batches=8, global_step=0)
    return module


def test_hard_finetune_trains_lora_on_the_frozen_pruners_drops(model_factory):
    """The last quarter of 8 steps: the pruner frozen, LoRA trained on the runtime's drops. Reference:
    the same weights in mask mode with the pruner's hard (straight-through) masks."""
    batch = make_batch([(2, 3), (4, 2)])
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    batch["labels"][:, :-1] = -100  # predicted from a text token (after a dropped visual token, the drop
    # path's hidden state is zero while the mask path computes one)
    module = hard_finetune_module(model_factory, hard_finetune=0.25)
    assert module.phase_steps() == (6, 2)
    module._trainer.global_step = 5
    module.on_train_batch_start(batch, 0)
    assert module._mode == "mask" and all(p.requires_grad for p in module.pruner.parameters())
    module._trainer.global_step = 6
    module.on_train_batch_start(batch, 0)
    assert module._mode == "drop" and not any(p.requires_grad for p in module.pruner.parameters())
    loss = module(batch, labels=batch["labels"]).loss
    loss.backward()
    kept = atp.stats(module.model).visual_tokens
    assert 0 < kept[:, 1:].float().mean() < 16  # tokens dropped, not all of them

    reference = hard_finetune_module(model_factory, straight_through=True)
    reference.use_mode("mask")
    reference.pruner.train()
    reference_loss = reference(batch, labels=batch["labels"]).loss
    reference_loss.backward()
    assert_close(loss, reference_loss, rtol=1e-4, atol=1e-5)
    lora = {n: p.grad for n, p in module.model.named_parameters() if "lora_" in n}
    reference_lora = {n: p.grad for n, p in reference.model.named_parameters() if "lora_" in n}
    assert sum(g.abs().sum() for g in lora.values()) > 0
    for name, grad in lora.items():
        assert_close(grad, reference_lora[name], rtol=1e-3, atol=1e-6)
    assert all(p.grad is None for p in module.pruner.parameters())


def test_hard_finetune_restarts_the_schedule_after_the_unchanged_soft_phase(model_factory):
    def rates(module, steps: int) -> list[float]:
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
        return [scheduler.lr_lambdas[0](step) for step in range(steps)]

    with_hard = hard_finetune_module(model_factory, hard_finetune=0.25, warmup_ratio=0.4)
    without = hard_finetune_module(model_factory, warmup_ratio=0.4)
    without._trainer.estimated_stepping_batches = 6  # the soft phase alone
    assert rates(with_hard, 6) == rates(without, 6)
    assert rates(with_hard, 8)[6:] == pytest.approx([1.0, 0.5])  # cosine from the full rate over 2 steps


def test_hard_finetune_refuses_what_cannot_train_it(model_factory):
    from lightning.pytorch.strategies import DDPStrategy

    with pytest.raises(ValueError, match=r"hard_finetune=1.0 is outside \[0, 1\)"):
        VLMTrainingModule(model_factory(), ATPPruner(num_layers=4, hidden=8), train_parts="lora", hard_finetune=1.0)
    with pytest.raises(ValueError, match=r"hard_finetune=0.2 .* train_parts=pruner trains nothing else"):
        VLMTrainingModule(model_factory(), ATPPruner(num_layers=4, hidden=8), train_parts="pruner", hard_finetune=0.2)
    with pytest.raises(ValueError, match=r"hard_finetune=0.2 .* there is no pruner"):
        VLMTrainingModule(model_factory(), None, train_parts="lora", hard_finetune=0.2)
    module = hard_finetune_module(model_factory, hard_finetune=0.2)
    module._trainer.strategy = DDPStrategy(find_unused_parameters=False)
    with pytest.raises(ValueError, match=r"set strategy.find_unused_parameters=true"):
        module.on_fit_start()
    module._trainer.strategy = DDPStrategy(find_unused_parameters=True)
    module.on_fit_start()
