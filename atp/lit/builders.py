"""What every job runner builds from its Hydra config: the model, the pruner, the loggers and the
Lightning Trainer, after checking that the weights and data the config names are on this machine.

Shared by the runners (`atp.lit.run`: training, `atp.lit.fitprune_run`, `atp.lit.structural_run`,
`atp.lit.evaluate_run`), so that no runner imports another.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

import atp
from atp.data.processor import build_internvl_processor, build_processor, build_qwen_processor, load_processor
from atp.data.shapes import vocabulary
from atp.lit.callbacks import default_progress_bar
from atp.models.build import build_testbed_internvl, build_testbed_llava, build_testbed_qwen, load_vlm
from atp.runtime.pruner import pruner_class


class MissingAssetError(ValueError):
    """Raised at once when a config needs weights or data that are not on this machine."""


def check_assets(cfg: DictConfig, needs: tuple[str, ...] = ("train_json", "val_json", "image_folder")) -> None:
    """Fail fast, naming the overrides, when a recipe needs real weights or data.

    needs: the data keys the job reads ("calibration" stands for fit.calibration_json and
    data.image_folder).
    """
    problems = []
    weights = cfg.model.get("weights") or "llava-hf/llava-1.5-7b-hf"  # the download model.path names
    if cfg.model.kind == "pretrained" and (not cfg.model.path or not Path(cfg.model.path, "config.json").is_file()):
        problems.append(f"model.path={cfg.model.path} (a local {weights} directory with config.json)")
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
            " (data: LLaVA-665K-format JSON and its image folder)"
        )


MODEL_KINDS = ("testbed", "testbed_qwen", "testbed_internvl", "pretrained")


def build_model(cfg: DictConfig):
    """(model, processor) for cfg.model: a testbed LLaVA, Qwen-VL or InternVL built from scratch, or a local
    model of any supported family (LLaVA, LLaVA-NeXT, OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL)
    with its processor."""
    params = {k: v for k, v in cfg.model.items() if k != "kind"}
    if cfg.model.kind == "testbed":
        processor = build_processor(vocabulary())
        return build_testbed_llava(processor, **params), processor
    if cfg.model.kind == "testbed_qwen":
        processor = build_qwen_processor(vocabulary())
        return build_testbed_qwen(processor, **params), processor
    if cfg.model.kind == "testbed_internvl":
        tiling = {key: params.pop(key) for key in ("tile_size", "max_tiles") if key in params}
        processor = build_internvl_processor(vocabulary(), patch_size=params.get("patch_size", 14), **tiling)
        return build_testbed_internvl(processor, **params), processor
    if cfg.model.kind == "pretrained":
        model, _ = load_vlm(
            cfg.model.path,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            with_processor=False,
            setting="model.path",
        )
        return model, load_processor(cfg.model.path)
    raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {cfg.model.kind!r}.")


def build_pruner(cfg: DictConfig | dict | None, num_layers: int) -> atp.TokenPruner | None:
    """A pruner from its config group (`name` plus constructor arguments), or None."""
    if cfg is None or cfg.get("name") is None:
        return None
    kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True).items() if k != "name"}
    cls = pruner_class(cfg["name"])
    if "num_layers" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("num_layers", num_layers)
    return atp.build_pruner(cfg["name"], **kwargs)


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


def build_trainer(cfg: DictConfig, loggers: list, strategy=None) -> L.Trainer:
    """A Lightning Trainer from cfg.trainer, cfg.strategy (or `strategy`, built by the caller) and
    cfg.callbacks, logging to `loggers`."""
    callbacks = [instantiate(spec) for spec in (cfg.get("callbacks") or {}).values()]
    if not loggers:  # nothing to log learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(default_progress_bar())  # "Epoch 0, step 37/140", not "Epoch 0/-2"
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        strategy=strategy if strategy is not None else build_strategy(cfg),
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
