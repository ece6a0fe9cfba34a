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
    trainer = build_trainer(cfg, build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.export and trainer.is_global_zero and not trainer.fast_dev_run:
        metrics["keep_ratio"] = float(module.keep_ratio(module.current_mask()))
        module.export(cfg.export_dir)
        tokenizer.save_pretrained(cfg.export_dir)
        Path(cfg.export_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
