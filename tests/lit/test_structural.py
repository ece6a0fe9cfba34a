"""ATP structural pruning end to end on a tiny GQA Llama: train (generator + LoRA + group
lasso), check the reached parameter ratio and the zeroed LoRA groups, export, reload."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

import atp  # noqa: F401  (registers the exported model classes)
from atp.lit.structural import StructuralPruningModule, reached_keep_ratio
from atp.structural import decoder_parameters
from tests.structural.test_export import tiny_decoder


def token_batches(seed: int, count: int = 32, length: int = 12):
    """A learnable toy language: every sequence counts up from a random start (mod 64)."""
    start = torch.randint(0, 64, (count, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + torch.arange(length)) % 64
    return DataLoader(
        TensorDataset(ids), batch_size=8, collate_fn=lambda rows: as_batch(torch.stack([r[0] for r in rows]))
    )


def as_batch(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_structural_pruning_reaches_the_ratio_zeroes_masked_lora_and_exports(tmp_path):
    torch.manual_seed(0)
    model = tiny_decoder("llama")
    dense = decoder_parameters(model.config)
    module = StructuralPruningModule(
        model, prune_ratio=0.4, control_epochs=12, generator_lr=0.05, lora_lr=1e-3, lora_rank=4, lasso_eta=0.05
    )
    trainer = L.Trainer(
        max_epochs=13, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, train_dataloaders={"train": token_batches(0), "held_out": token_batches(1)})
    assert reached_keep_ratio(module) == pytest.approx(0.6, rel=0.02)
    mask = module.current_mask()
    assert module.masked_lora_norm(mask) == 0.0
    assert any(not bool(m.all()) for m in mask.channels)
    ids = next(iter(token_batches(2)))["input_ids"]
    module.masker.set(mask, "full")
    with torch.no_grad():
        masked = module.model(input_ids=ids).logits
    module.export(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    kept = sum(p.numel() for p in loaded.model.layers.parameters())
    assert kept == decoder_parameters(tiny_decoder("llama").config, mask) < dense
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)


def test_structural_module_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match=r"prune_ratio must be in \(0, 1\)"):
        StructuralPruningModule(tiny_decoder("llama"), prune_ratio=1.2)
    with pytest.raises(ValueError, match="no structural group definitions for model_type 'gpt2'"):
        StructuralPruningModule(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))


def compose_structural(overrides: list[str]):
    from tests.lit.test_train import compose_train

    return compose_train(overrides)


def test_tiny_structural_experiment_runs_fast_dev_run(tmp_path):
    from atp.lit.run import run_job

    cfg = compose_structural(
        ["experiment=atp_struct_tiny", "debug=fast_dev_run", f"output_dir={tmp_path}", "logger=none"]
    )
    metrics = run_job(cfg)
    assert "train/loss" in metrics and not (tmp_path / "export").exists()


def test_structural_experiments_without_weights_stop_with_the_overrides_to_set(tmp_path):
    from atp.lit.run import MissingAssetError, run_job

    cfg = compose_structural(["experiment=atp_struct_llama2_7b", f"output_dir={tmp_path}", "logger=none"])
    with pytest.raises(MissingAssetError, match=r"model\.path=None.*experiment=atp_struct_llama2_7b model\.path="):
        run_job(cfg)
    missing = tmp_path / "nowhere.gguf"
    cfg = compose_structural(
        ["experiment=atp_struct_smollm2", f"model.gguf={missing}", f"model.path={tmp_path}/smol", "logger=none"]
    )
    with pytest.raises(MissingAssetError, match=f"GGUF file {missing} does not exist"):
        run_job(cfg)
