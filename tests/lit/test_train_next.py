"""ATP trains on a tiny LLaVA-NeXT through the Lightning module (image_sizes travel with the batch)
and then prunes in drop mode, where drop equals mask at every kept position and newline tokens stay."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

import atp
from atp.lit.module import VLMTrainingModule
from atp.token.atp import ATPPruner
from tests.next_inputs import IMAGE, SQUARE, TALL, WIDE, next_batch, next_model, stock_reference

SPECS = [(2, [WIDE], 3), (4, [SQUARE], 2), (1, [TALL], 4)]


def mid_range_pruner() -> ATPPruner:
    """Thresholds inside the score ranges: training masks are fractional and drop mode prunes."""
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], hidden=16)
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.2)
            module.spatial_head.bias.fill_(1.0)
    return pruner


def test_atp_trains_then_prunes_in_drop_mode_on_llava_next():
    model = next_model("llava_next")
    batch = next_batch(model, SPECS)
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    batch["labels"][:, -2:] = batch["input_ids"][:, -2:]  # the last two tokens are the answer
    pruner = mid_range_pruner()
    before = [p.detach().clone() for p in pruner.parameters()]
    module = VLMTrainingModule(model, pruner, train_parts="pruner", pruner_lr=1e-2, warmup_ratio=0.0)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader([batch] * 3, batch_size=None))
    assert all(torch.isfinite(p).all() for p in pruner.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, pruner.parameters()))  # it trained
    assert atp.stats(model).soft_visual_tokens[:, -1].sum() < atp.stats(model).num_visual.sum()  # soft masks

    pruner.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = stock_reference(model, inputs)
    structure = ((batch["input_ids"] != IMAGE) | reference["newline"]) & batch["attention_mask"].bool()
    logits, stats = {}, {}
    for mode in ("drop", "mask"):
        atp.apply(model, pruner, mode=mode)
        with torch.no_grad():
            logits[mode] = model(**inputs).logits
        stats[mode] = atp.stats(model)
        assert (stats[mode].tokens - stats[mode].visual_tokens == structure.sum(1, keepdim=True)).all()
    assert stats["drop"].visual_tokens[:, -1].sum() < stats["drop"].num_visual.sum()  # really prunes
    assert torch.equal(stats["drop"].visual_tokens, stats["mask"].visual_tokens)
    keep = structure.clone()
    for b, positions in enumerate(reference["content"]):
        for number in stats["drop"].kept[3][b].tolist():
            keep[b, positions[number]] = True
    assert_close(logits["drop"][keep], logits["mask"][keep], rtol=1e-4, atol=1e-5)


def test_an_absolute_atp_target_is_refused_on_llava_next():
    """LLaVA-NeXT's config says image_seq_length=576 whatever the image; a token count target would be
    measured against that, so only a fraction of each sample's content tokens is accepted."""
    model = next_model("llava_next")
    assert model.config.image_seq_length == 576
    with pytest.raises(ValueError, match="gives each image its own number of visual tokens"):
        VLMTrainingModule(model, mid_range_pruner(), train_parts="pruner", target_tokens=36)
    VLMTrainingModule(model, mid_range_pruner(), train_parts="pruner", target_tokens=0.25)  # a fraction is fine
