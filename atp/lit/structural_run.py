"""train.py job=structural: ATP all-in-one structural pruning of a causal LM on a text corpus,
then export of the smaller model (a `from_pretrained` checkpoint with its tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from atp.data.text import TextDataModule, topic_splits, train_tokenizer
from atp.lit.builders import MissingAssetError, build_loggers, build_trainer, resolve_ckpt_path
from atp.lit.structural import StructuralPruningModule
from atp.models.causal import convert_gguf, load_causal_lm, smollm2_gguf_path, tiny_causal_lm


def build_causal_model(cfg: DictConfig):
    """(model, tokenizer) for cfg.model: kind causal_tiny | gguf | causal_pretrained."""
    spec = cfg.model
    if spec.kind == "causal_tiny":
        tokenizer = train_tokenizer(topic_splits(cfg.seed)["train"], spec.vocab_size)
        settings = {k: v for k, v in spec.items() if k not in ("kind", "family")}
        return tiny_causal_lm(spec.family, **settings), tokenizer
    if spec.kind == "gguf":
        if not Path(spec.path, "config.json").is_file():
            try:
                gguf = Path(spec.gguf) if spec.gguf else smollm2_gguf_path()
                convert_gguf(gguf, spec.path)
            except FileNotFoundError as error:
                raise MissingAssetError(f"{error} (converted once to model.path={spec.path})") from error
        return load_causal_lm(spec.path, spec.dtype)
    if spec.kind == "causal_pretrained":
        if not spec.path or not Path(spec.path, "config.json").is_file():
            raise MissingAssetError(
                f"this experiment needs weights that are not here. Set: model.path={spec.path} (a local HF "
                f"directory, e.g. a meta-llama/Llama-2-7b-hf download). Example: python train.py "
                f"experiment={cfg.experiment_name} model.path=..."
            )
        return load_causal_lm(spec.path, spec.dtype)
    raise ValueError(
        f"model.kind for job=structural must be causal_tiny, gguf or causal_pretrained, got {spec.kind!r}."
    )


DEEPSPEED_TARGET = "lightning.pytorch.strategies.DeepSpeedStrategy"


def structural_deepspeed_config(cfg: DictConfig) -> dict:
    """The DeepSpeed config for StructuralPruningModule under cfg.strategy (a DeepSpeedStrategy).

    The module optimises manually with one optimizer (generator and LoRA parameter groups) and
    one scheduler, which is what DeepSpeed accepts. DeepSpeed clips gradients inside
    `engine.step()`, so `gradient_clipping` is the module's generator clip and applies to the
    LoRA steps too [ours] (`self.clip_gradients` is a no-op under DeepSpeed). The optimizer is
    torch's AdamW (`zero_allow_untested_optimizer`). Not run on a GPU in this project's tests:
    under ZeRO the optimizer also steps the parameters without a gradient in a step (zero
    gradients), so Adam's momentum keeps moving the generator during LoRA steps; prefer
    strategy=ddp for the structural job until that is checked on GPUs."""
    spec = cfg.get("strategy")
    if spec is None or spec.get("_target_") != DEEPSPEED_TARGET:
        raise ValueError(
            f"cfg.strategy is not a DeepSpeed strategy (_target_ {None if spec is None else spec.get('_target_')!r}); "
            "choose strategy=deepspeed_stage_2 or strategy=deepspeed_stage_3."
        )
    zero: dict = {"stage": int(spec.stage)}
    if spec.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.get("offload_parameters"):
        zero["offload_param"] = {"device": "cpu"}
    return {
        "zero_optimization": zero,
        "gradient_clipping": float(cfg.module.gradient_clip),
        "train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": str(cfg.trainer.get("precision", "32")).startswith("bf16")},
    }


def build_structural_strategy(cfg: DictConfig):
    """cfg.strategy, with the structural DeepSpeed config when it is a DeepSpeed strategy."""
    spec = cfg.get("strategy")
    if spec is not None and spec.get("_target_") == DEEPSPEED_TARGET:
        from hydra.utils import get_class

        return get_class(DEEPSPEED_TARGET)(config=structural_deepspeed_config(cfg))
    return None


def run_structural(cfg: DictConfig) -> dict:
    """Fit StructuralPruningModule; export the pruned model. Returns the final logged metrics."""
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = build_causal_model(cfg)
    data = cfg.data
    datamodule = TextDataModule(
        tokenizer,
        seq_len=data.seq_len,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        max_train_chunks=data.max_train_chunks,
        max_eval_chunks=data.max_eval_chunks,
        seed=cfg.seed,
    )
    module = StructuralPruningModule(model, seed=cfg.seed, **OmegaConf.to_container(cfg.module, resolve=True))
    trainer = build_trainer(cfg, build_loggers(cfg), strategy=build_structural_strategy(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.export and trainer.is_global_zero and not trainer.fast_dev_run:
        metrics["keep_ratio"] = float(module.keep_ratio(module.current_mask()))
        module.export(cfg.export_dir)
        tokenizer.save_pretrained(cfg.export_dir)
        Path(cfg.export_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
