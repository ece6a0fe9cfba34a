"""Compose Lightning objects from a Hydra config and run training (train.py is a thin wrapper)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

import atp
from atp.export import save_model, save_pruned
from atp.lit.builders import (  # noqa: F401  (MissingAssetError: what run_job raises; callers catch it from here)
    MissingAssetError,
    build_loggers,
    build_model,
    build_pruner,
    build_trainer,
    check_assets,
    resolve_ckpt_path,
)
from atp.lit.data import LlavaDataModule, prepare_configured_data
from atp.lit.module import VLMTrainingModule


def build_datamodule(cfg: DictConfig, processor) -> LlavaDataModule:
    data = cfg.data
    prepare_configured_data(data)
    return LlavaDataModule(
        processor,
        data.train_json,
        data.val_json,
        data.image_folder,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        max_train_samples=data.max_train_samples,
        max_val_samples=data.max_val_samples,
        seed=cfg.seed,
    )


def run_job(cfg: DictConfig) -> dict:
    """What train.py runs: Lightning training of a VLM (job=train), fitting a FitPrune recipe
    (job=fitprune), searching VFlowOpt settings (job=vflowopt), or ATP structural pruning of a causal LM
    (job=structural)."""
    if cfg.job == "fitprune":
        from atp.lit.fitprune_run import run_fitprune

        return run_fitprune(cfg)
    if cfg.job == "vflowopt":
        from atp.lit.vflowopt_run import run_vflowopt

        return run_vflowopt(cfg)
    if cfg.job == "structural":
        from atp.lit.structural_run import run_structural

        return run_structural(cfg)
    if cfg.job != "train":
        raise ValueError(f"job must be 'train', 'fitprune', 'vflowopt' or 'structural', got {cfg.job!r}.")
    return run_training(cfg)


def run_training(cfg: DictConfig) -> dict:
    """Fit the configured module; export the result. Returns the final logged metrics."""
    check_assets(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model, processor = build_model(cfg)
    pruner = build_pruner(cfg.pruner, model.config.text_config.num_hidden_layers)
    module = VLMTrainingModule(model, pruner, **OmegaConf.to_container(cfg.module, resolve=True))
    datamodule = build_datamodule(cfg, processor)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, loggers)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.export and trainer.is_global_zero and not trainer.fast_dev_run:
            model = module.merged_model()
            if pruner is None:
                save_model(cfg.export_dir, model, processor)
            else:
                atp.remove(model)
                base = cfg.model.path if cfg.model.kind == "pretrained" and cfg.module.train_parts == "pruner" else None
                save_pruned(cfg.export_dir, model, processor, pruner, base_reference=base)
            Path(cfg.export_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
