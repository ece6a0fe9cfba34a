"""Killing a structural run inside its search and resuming from the checkpoint gives the same
generator, LoRA, lasso and optimizer state as the unbroken run; the DeepSpeed config for the
module's manual optimisation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from atp.lit.structural import StructuralPruningModule
from tests.lit.test_structural import token_batches
from tests.structural.test_export import tiny_decoder


class Killed(RuntimeError):
    pass


class KillAtEpoch(Callback):
    """Stands in for a killed process: raises at the start of epoch `epoch` (the previous
    epoch's checkpoint is on disk)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed at the start of epoch {self.epoch}")


def new_module() -> StructuralPruningModule:
    torch.manual_seed(0)  # LoRA A's initialisation
    return StructuralPruningModule(
        tiny_decoder("llama"), prune_ratio=0.4, control_epochs=2, generator_lr=1e-2, lora_lr=1e-3, lora_rank=4,
        lasso_eta=0.05,
    )  # fmt: skip


def fit(module, callbacks=(), ckpt_path=None):
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )  # fmt: skip
    trainer.fit(
        module, train_dataloaders={"train": token_batches(0), "held_out": token_batches(1)}, ckpt_path=ckpt_path
    )
    return trainer


def state(module: StructuralPruningModule, trainer: L.Trainer) -> dict[str, torch.Tensor]:
    everything = {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k or "generator" in k}
    everything.update({k: getattr(module, k).clone() for k in ("lora_steps", "generator_steps", "frozen_flat")})
    everything["eta"] = torch.tensor(module.eta())
    optimizer = trainer.optimizers[0].state_dict()
    for index, entry in optimizer["state"].items():
        for key, value in entry.items():
            everything[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone()
    everything["lr"] = torch.tensor([group["lr"] for group in optimizer["param_groups"]])
    return everything


def test_killed_and_resumed_structural_run_equals_the_unbroken_run(tmp_path):
    unbroken = new_module()
    reference = state(unbroken, fit(unbroken))
    broken = new_module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1, save_top_k=-1)
    with pytest.raises(Killed):
        fit(broken, [checkpoint, KillAtEpoch(1)])  # killed inside the search (control epochs 0 and 1)
    assert (tmp_path / "last.ckpt").is_file()
    resumed = new_module()
    torch.manual_seed(123)  # the resumed process's global RNG differs; nothing may depend on it
    resumed.generator.noise_rng.manual_seed(99)  # nor on a fresh noise stream: it must come from the checkpoint
    trainer = fit(resumed, [ModelCheckpoint(dirpath=tmp_path / "again")], ckpt_path=str(tmp_path / "last.ckpt"))
    restored = state(resumed, trainer)
    assert restored.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(restored[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
    assert bool(resumed.is_frozen) and torch.equal(resumed.frozen_flat, unbroken.frozen_flat)
    assert [r["generator/ce"] for r in resumed.search_log] == pytest.approx(
        [r["generator/ce"] for r in unbroken.search_log[len(unbroken.search_log) - len(resumed.search_log) :]]
    )


def test_deepspeed_config_for_the_structural_module():
    from atp.lit.structural_run import structural_deepspeed_config
    from tests.lit.test_structural import compose_structural

    cfg = compose_structural(["experiment=atp_struct_tiny", "strategy=deepspeed_stage_2", "logger=none"])
    config = structural_deepspeed_config(cfg)
    assert config == {
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 3.0,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
    }
    module = new_module()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Optimizer)  # DeepSpeed takes one optimizer and one scheduler
    assert scheduler.optimizer is optimizer
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in module.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    cfg3 = compose_structural(["experiment=atp_struct_tiny", "strategy=deepspeed_stage_3", "logger=none"])
    assert structural_deepspeed_config(cfg3)["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="not a DeepSpeed strategy"):
        structural_deepspeed_config(compose_structural(["experiment=atp_struct_tiny", "logger=none"]))


def test_deepspeed_config_follows_precision_and_offload_and_reaches_the_strategy(monkeypatch):
    """bf16 follows trainer.precision, the offload flags become ZeRO's offload entries, and the
    strategy is built with this config (DeepSpeed itself is not installed here: the class is
    replaced by a recorder, no op is compiled)."""
    import hydra.utils

    from atp.lit.structural_run import build_structural_strategy, structural_deepspeed_config
    from tests.lit.test_structural import compose_structural

    overrides = ["experiment=atp_struct_tiny", "strategy=deepspeed_stage_3", "logger=none", "trainer=gpu"]
    offloaded = overrides + ["strategy.offload_optimizer=true", "strategy.offload_parameters=true"]
    config = structural_deepspeed_config(compose_structural(offloaded))
    assert config["bf16"] == {"enabled": True}  # conf/trainer/gpu.yaml: bf16-mixed
    assert config["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}
    }  # fmt: skip
    built = {}

    def recorder(target):
        assert target == "lightning.pytorch.strategies.DeepSpeedStrategy"
        return lambda **kwargs: built.update(kwargs) or "strategy"

    monkeypatch.setattr(hydra.utils, "get_class", recorder)
    cfg = compose_structural(overrides)
    assert build_structural_strategy(cfg) == "strategy"
    assert built == {"config": structural_deepspeed_config(cfg)}
    assert build_structural_strategy(compose_structural(["experiment=atp_struct_tiny", "logger=none"])) is None
