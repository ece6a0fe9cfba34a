"""Evaluate one model + pruner from a Hydra config (evaluate.py is a thin wrapper)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import atp
from atp.data.llava_format import prompt_loader
from atp.data.processor import load_processor
from atp.evaluation import EvaluationResult, evaluate, latency_warnings, markdown_table
from atp.export import load_pruned
from atp.lit.builders import build_pruner
from atp.lit.data import prepare_configured_data
from atp.models import get_adapter
from atp.models.build import load_vlm, resolve_device


def method_label(cfg: DictConfig, pruner) -> str:
    if cfg.method_name:
        return str(cfg.method_name)
    if cfg.budget_tokens is not None and pruner is not None:
        return f"{pruner.name} @ {cfg.budget_tokens} tokens"
    if cfg.export_path:
        return f"{pruner.name} ({Path(cfg.export_path).name})"
    if pruner is None:
        return "unpruned"
    settings = ", ".join(
        f"{k}={v}" for k, v in pruner.build_kwargs().items() if k not in ("position_ids", "num_layers")
    )
    return f"{pruner.name} ({settings})"


def budgeted_pruner_config(cfg: DictConfig, model, processor) -> dict:
    """cfg.pruner with its budget arguments set for `budget_tokens` retained visual tokens;
    fitprune first fits its recipe, to the prefill FLOPs FastV spends at that budget; vflowopt first
    searches its settings (`vflowopt_budgeted_config`)."""
    from atp.budget import budget_flops_ratio, budget_kwargs

    spec = OmegaConf.to_container(cfg.pruner, resolve=False)
    if spec.get("name") is None:  # the unpruned model has no budget
        return spec
    grid = get_adapter(model).fixed_grid
    if grid is None:
        raise ValueError(
            f"budget_tokens={cfg.budget_tokens} converts a token count into each method's budget for one fixed "
            f"number of visual tokens per image, but {type(model).__name__} gives every image its own count. "
            "Set the pruner's own budget instead (e.g. pruner.keep_ratio=0.25) and leave budget_tokens unset."
        )
    num_visual, text = grid[0] * grid[1], model.config.text_config
    if spec.get("name") == "vflowopt":
        return vflowopt_budgeted_config(cfg, spec, model, processor, num_visual)
    if spec.get("name") != "fitprune":
        vision_layers = getattr(getattr(model.config, "vision_config", None), "num_hidden_layers", None)
        budget = budget_kwargs(spec["name"], cfg.budget_tokens, num_visual, text.num_hidden_layers, vision_layers)
        return {**spec, **budget}
    from atp.calibration.fitprune import FitPruneFitter
    from atp.lit.fitprune_run import calibration_batches

    batches = calibration_batches(
        cfg.fit_calibration_json, cfg.data.image_folder, processor, cfg.fit_calibration_samples, cfg.batch_size
    )
    adapter = get_adapter(model)  # text and structural (newline) tokens are the ones pruning never removes
    prompt_text = torch.cat([b["attention_mask"].sum(1) - adapter.visual_token_counts(b) for b in batches])
    budget = budget_flops_ratio(cfg.budget_tokens, num_visual, float(prompt_text.double().mean()), text)
    best, _ = FitPruneFitter(model, batches, budget).fit()
    return {**spec, "recipe": best.recipe}


def vflowopt_budgeted_config(cfg: DictConfig, spec: dict, model, processor, num_visual: int) -> dict:
    """cfg.pruner for VFlowOpt at `budget_tokens`: the recipe its flow-guided search finds on the calibration
    prompts for the average share budget_tokens / visual tokens (`atp.budget.vflowopt_budget`)."""
    from atp.budget import vflowopt_budget
    from atp.calibration.vflowopt import VFlowOptSearch
    from atp.lit.fitprune_run import calibration_batches

    num_layers = model.config.text_config.num_hidden_layers
    settings = vflowopt_budget(cfg.budget_tokens, num_visual, num_layers)
    batches = calibration_batches(
        cfg.fit_calibration_json, cfg.data.image_folder, processor, cfg.fit_calibration_samples, cfg.batch_size
    )
    vision_layer = int(spec.get("vision_layer", -2))
    search = VFlowOptSearch(model, batches, vision_layer=vision_layer, **settings)
    best, _ = search.fit(int(cfg.vflowopt_calls), int(cfg.vflowopt_initial_points))
    return {
        "name": "vflowopt",
        "recipe": best.recipe(settings["layers"], vision_layer),
        "position_ids": spec.get("position_ids", "reference"),
    }


def run_evaluation(cfg: DictConfig) -> EvaluationResult:
    device = resolve_device(cfg.device)
    if cfg.export_path:
        model, processor = load_pruned(
            cfg.export_path, mode=cfg.mode, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )
        pruner = atp.runtime_of(model).pruner
        model.to(device)
        pruner.to(device)  # the runtime holds the pruner outside the model's modules
        prepare_configured_data(cfg.data)  # after the model loads: a wrong path fails at once
    else:
        model, _ = load_vlm(
            cfg.model_path,
            dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            with_processor=False,
            setting="model_path",
        )
        processor = load_processor(cfg.model_path)
        model.to(device)  # before a budgeted fit and atp.apply, which moves the pruner to the model
        prepare_configured_data(cfg.data)
        pruner_cfg = cfg.pruner
        if cfg.budget_tokens is not None:
            pruner_cfg = budgeted_pruner_config(cfg, model, processor)
        pruner = build_pruner(pruner_cfg, model.config.text_config.num_hidden_layers)
        if pruner is not None:
            atp.apply(model, pruner.eval(), mode=cfg.mode)
    model.eval()
    loader = prompt_loader(
        cfg.data[f"{cfg.split}_json"], cfg.data.image_folder, processor, cfg.max_samples, cfg.batch_size
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
    (out / "results.json").write_text(json.dumps({**result.as_dict(), "budget_tokens": cfg.budget_tokens}, indent=1))
    text = "\n".join([markdown_table([result]), *latency_warnings([result])])
    (out / "results.md").write_text(text + "\n")
    print(text)
    return result
