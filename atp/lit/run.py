"""Compose Lightning objects from a Hydra config and run training (train.py is a thin wrapper)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

import atp
from atp.data.processor import build_processor
from atp.data.shapes import vocabulary
from atp.export import save_model, save_pruned
from atp.lit.callbacks import default_progress_bar
from atp.lit.data import LlavaDataModule, prepare_configured_data
from atp.lit.module import VLMTrainingModule
from atp.models.build import build_testbed_llava, load_llava


class MissingAssetError(ValueError):
    """Raised at once when a config needs weights or data that are not on this machine."""


def check_assets(cfg: DictConfig, needs: tuple[str, ...] = ("train_json", "val_json", "image_folder")) -> None:
    """Fail fast, naming the overrides, when a recipe needs real weights or data.

    needs: the data keys the job reads ("calibration" stands for fit.calibration_json and
    data.image_folder).
    """
    problems = []
    if cfg.model.kind == "pretrained" and (not cfg.model.path or not Path(cfg.model.path, "config.json").is_file()):
        problems.append(f"model.path={cfg.model.path} (a local LLaVA directory with config.json)")
    if cfg.data.kind != "shapes":
        keys = ["fit.calibration_json", "data.image_folder"] if "calibration" in needs else [f"data.{k}" for k in needs]
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if not value or not Path(value).exists():
                problems.append(f"{key}={value}")
    if problems:
        example = " ".join(f"{p.split('=')[0]}=..." for p in problems)
        raise MissingAssetError(
            "this experiment needs weights or data that are not here. Set: "
            + "; ".join(problems)
            + f". Example: python train.py experiment={cfg.experiment_name} {example}"
            " (model.path: a llava-hf/llava-1.5-7b-hf download; data: LLaVA-665K's JSON and image folder)"
        )


def build_model(cfg: DictConfig):
    """(model, processor) for cfg.model."""
    if cfg.model.kind == "testbed":
        processor = build_processor(vocabulary())
        params = {k: v for k, v in cfg.model.items() if k != "kind"}
        return build_testbed_llava(processor, **params), processor
    if cfg.model.kind == "pretrained":
        return load_llava(cfg.model.path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    raise ValueError(f"model.kind must be 'testbed' or 'pretrained', got {cfg.model.kind!r}.")


def build_pruner(cfg: DictConfig | dict | None, num_layers: int) -> atp.TokenPruner | None:
    """A pruner from its config group (`name` plus constructor arguments), or None."""
    if cfg is None or cfg.get("name") is None:
        return None
    kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True).items() if k != "name"}
    cls = atp.token.base.pruner_class(cfg["name"])
    if "num_layers" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("num_layers", num_layers)
    return atp.build_pruner(cfg["name"], **kwargs)


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


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, spec in (cfg.get("logger") or {}).items():
        spec = OmegaConf.to_container(spec, resolve=True)
        if name == "wandb" and spec.get("offline") is None:
            spec["offline"] = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
        loggers.append(instantiate(spec))
    return loggers


def build_strategy(cfg: DictConfig):
    spec = cfg.get("strategy")
    if spec is None or spec.get("_target_") is None:
        return "auto"
    return instantiate(spec)


def build_trainer(cfg: DictConfig, loggers: list) -> L.Trainer:
    """A Lightning Trainer from cfg.trainer, cfg.strategy and cfg.callbacks, logging to `loggers`."""
    callbacks = [instantiate(spec) for spec in (cfg.get("callbacks") or {}).values()]
    if not loggers:  # nothing to log learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(default_progress_bar())  # "Epoch 0, step 37/140", not "Epoch 0/-2"
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        strategy=build_strategy(cfg),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=cfg.output_dir,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
    )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    last = Path(cfg.output_dir, "checkpoints", "last.ckpt")
    return str(last) if last.is_file() else None


def run_job(cfg: DictConfig) -> dict:
    """What train.py runs: Lightning training of a VLM (job=train), fitting a FitPrune recipe
    (job=fitprune), or ATP structural pruning of a causal LM (job=structural)."""
    if cfg.job == "fitprune":
        from atp.calibration.run import run_fitprune

        return run_fitprune(cfg)
    if cfg.job == "structural":
        from atp.lit.structural_run import run_structural

        return run_structural(cfg)
    if cfg.job != "train":
        raise ValueError(f"job must be 'train', 'fitprune' or 'structural', got {cfg.job!r}.")
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
