"""Callbacks that log what the pruner is doing, and the training progress bar."""

from __future__ import annotations

import importlib.util

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from atp.token.atp import ATPPruner


class TokenBudgetLogger(L.Callback):
    """Per ATP module: mean (soft) visual tokens kept and the mean thresholds; and the budget."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        pruner = getattr(module, "pruner", None)
        if not isinstance(pruner, ATPPruner) or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        size = batch["input_ids"].shape[0]
        metrics = {}
        for layer, count in pruner.soft_counts.items():
            metrics[f"atp/kept_tokens_layer{layer}"] = count.detach().float().mean()
        for layer, thresholds in pruner.thresholds.items():
            metrics[f"atp/theta_r_layer{layer}"] = thresholds[:, 0].mean()
            metrics[f"atp/theta_s_layer{layer}"] = thresholds[:, 1].mean()
        metrics["atp/target_tokens"] = float(module.scheduled_target())
        module.log_dict(metrics, batch_size=size)


class SaveTrainablesPerRank(L.Callback):
    """At the end of fit, save each rank's trainable parameters to
    `<dirpath>/trainables_rank<r>.safetensors` (to check that distributed ranks agree)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        save_file(state, str(Path(self.dirpath) / f"trainables_rank{trainer.global_rank}.safetensors"))


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, whose description reads "Epoch 0, step 37/140" when the
    run is limited by steps (max_epochs -1 or None), instead of "Epoch 0/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        steps = f"{trainer.global_step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"{trainer.global_step}"
        return f"Epoch {current_epoch}, step {steps}"

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)


def default_progress_bar() -> L.pytorch.callbacks.ProgressBar:
    """The bar Lightning would pick (Rich when installed, else tqdm), with step counts for
    step-limited runs on the Rich bar (tqdm's reads "Epoch 0" already)."""
    if importlib.util.find_spec("rich") is None:
        return TQDMProgressBar()
    return StepProgressBar()
