"""Callbacks that log what the pruner is doing, and the training progress bar."""

from __future__ import annotations

import importlib.util

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from atp.token.atp import ATPPruner


class TokenBudgetLogger(L.Callback):
    """Per ATP module: mean (soft) visual tokens kept and the mean thresholds; and the budget.

    Every value goes to all loggers as a scalar. On W&B, the kept-token scalars are also
    drawn as one chart, a line per ATP module plus the target (`KEPT_CHART`), at every
    validation and at the end of training; `history` holds what the chart draws:
    {series name: [(global step, value)]}.
    """

    KEPT_CHART = "atp/kept_tokens_per_module"

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

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
        for name, value in metrics.items():
            if name.startswith("atp/kept_tokens_layer") or name == "atp/target_tokens":
                self.history.setdefault(name.removeprefix("atp/"), []).append((trainer.global_step, float(value)))

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints, so a resumed run's chart starts at step 0."""
        return {"history": {name: [list(point) for point in points] for name, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {name: [tuple(point) for point in points] for name, points in state_dict["history"].items()}

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_chart(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.log_chart(trainer)

    def log_chart(self, trainer: L.Trainer) -> None:
        """Draw `history` on every W&B run of the trainer (nothing without W&B or history)."""
        runs = [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not runs or not self.history or not trainer.is_global_zero:
            return
        import wandb

        names = sorted(self.history)
        chart = wandb.plot.line_series(
            xs=[[step for step, _ in self.history[name]] for name in names],
            ys=[[value for _, value in self.history[name]] for name in names],
            keys=names,
            title="visual tokens kept per ATP module (batch mean) and the target",
            xname="step",
        )
        for run in runs:
            run.log({self.KEPT_CHART: chart})


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
