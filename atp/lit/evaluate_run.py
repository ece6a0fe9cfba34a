"""Evaluate one model + pruner from a Hydra config (evaluate.py is a thin wrapper)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import DataLoader

import atp
from atp.data.llava_format import LlavaConversationDataset, collate
from atp.evaluation import EvaluationResult, evaluate, markdown_table
from atp.export import load_pruned
from atp.lit.data import prepare_configured_data
from atp.lit.run import build_pruner
from atp.models.build import load_llava


def method_label(cfg: DictConfig, pruner) -> str:
    if cfg.method_name:
        return str(cfg.method_name)
    if cfg.export_path:
        return f"{pruner.name} ({Path(cfg.export_path).name})"
    if pruner is None:
        return "unpruned"
    settings = ", ".join(
        f"{k}={v}" for k, v in pruner.build_kwargs().items() if k not in ("position_ids", "num_layers")
    )
    return f"{pruner.name} ({settings})"


def run_evaluation(cfg: DictConfig) -> EvaluationResult:
    prepare_configured_data(cfg.data)
    if cfg.export_path:
        model, processor = load_pruned(
            cfg.export_path, mode=cfg.mode, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )
        pruner = atp.runtime_of(model).pruner
    else:
        model, processor = load_llava(cfg.model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
        pruner = build_pruner(cfg.pruner, model.config.text_config.num_hidden_layers)
        if pruner is not None:
            atp.apply(model, pruner.eval(), mode=cfg.mode)
    model.eval()
    dataset = LlavaConversationDataset(
        cfg.data[f"{cfg.split}_json"], cfg.data.image_folder, processor, max_samples=cfg.max_samples, prompt_only=True
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        collate_fn=functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id),
    )
    result = evaluate(
        model,
        processor,
        loader,
        method_label(cfg, pruner),
        max_new_tokens=cfg.max_new_tokens,
        latency_batches=cfg.latency_batches,
        latency_repeats=cfg.latency_repeats,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.as_dict(), indent=1))
    table = markdown_table([result])
    (out / "results.md").write_text(table + "\n")
    print(table)
    return result
