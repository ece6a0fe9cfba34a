"""`python train.py experiment=fitprune_shapes`: fit a FitPrune recipe and write it as JSON.

The job loads the model, takes `fit.calibration_samples` prompts (up to the first answer)
from `fit.calibration_json`, fits the recipe to `fit.flops_budget`, prints the per-layer
schedule, logs it to the configured loggers (a bar chart on W&B) and writes
`<output_dir>/recipe.json` atomically: the file `pruner=fitprune pruner.recipe=...` reads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from atp.calibration.fitprune import FitPruneFitter, Trial
from atp.data.llava_format import LlavaConversationDataset, collate
from atp.lit.builders import build_loggers, build_model, check_assets
from atp.lit.data import prepare_configured_data
from atp.models.adapter import MODEL_INPUT_KEYS
from atp.models.build import resolve_device


def calibration_batches(json_path: str, image_folder: str, processor, samples: int, batch_size: int) -> list[dict]:
    """The first `samples` prompts (up to the first answer) of a LLaVA-format JSON, batched."""
    dataset = LlavaConversationDataset(json_path, image_folder, processor, samples, prompt_only=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=lambda items: collate(items, processor.tokenizer.pad_token_id),
    )
    return [{k: batch[k] for k in MODEL_INPUT_KEYS if k in batch} for batch in loader]


def schedule_table(fitter: FitPruneFitter, trial: Trial) -> list[dict]:
    """Per layer: tokens deleted after it and visual tokens it processes (calibration mean)."""
    visual = fitter.visual_tokens_per_layer(trial.recipe).double().mean(0)
    return [
        {"layer": layer, "deleted": trial.recipe.get(layer, 0), "visual_tokens": float(visual[layer])}
        for layer in range(fitter.num_layers)
    ]


def log_schedule(cfg: DictConfig, rows: list[dict], summary: dict) -> None:
    for logger in build_loggers(cfg):
        logger.log_hyperparams(summary)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            table = wandb.Table(columns=["layer", "deleted", "visual_tokens"], data=[list(r.values()) for r in rows])
            logger.experiment.log(
                {
                    "fitprune/deleted_per_layer": wandb.plot.bar(
                        table, "layer", "deleted", title="tokens deleted after layer"
                    ),
                    "fitprune/visual_tokens_per_layer": wandb.plot.line(
                        table, "layer", "visual_tokens", title="visual tokens per layer"
                    ),
                }
            )
            wandb.finish()
        else:
            for row in rows:
                logger.log_metrics(
                    {"fitprune/deleted": row["deleted"], "fitprune/visual_tokens": row["visual_tokens"]},
                    step=row["layer"],
                )
            logger.save()


def write_json_atomically(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def calibration_setup(cfg: DictConfig) -> tuple:
    """(model in eval mode on cfg.fit.device, calibration batches) of a fitting job (`cfg.fit`)."""
    check_assets(cfg, needs=("calibration",))
    model, processor = build_model(cfg)
    model.to(resolve_device(cfg.fit.get("device", "auto"))).eval()
    prepare_configured_data(cfg.data)
    fit = cfg.fit
    batches = calibration_batches(
        fit.calibration_json, cfg.data.image_folder, processor, fit.calibration_samples, fit.batch_size
    )
    return model, batches


def run_fitprune(cfg: DictConfig) -> dict:
    """Fit, print, log and save the recipe; returns the JSON content written."""
    model, batches = calibration_setup(cfg)
    start = time.perf_counter()
    fitter = FitPruneFitter(model, batches, cfg.fit.flops_budget)
    best, trials = fitter.fit()
    seconds = time.perf_counter() - start
    rows = schedule_table(fitter, best)
    content = {
        "recipe": {str(layer): count for layer, count in best.recipe.items()},
        "flops_budget": float(cfg.fit.flops_budget),
        "alpha": best.alpha,
        "flops_ratio": best.flops_ratio,
        "calibration_samples": int(fitter.num_visual.numel()),
        "calibration_json": str(cfg.fit.calibration_json),
        "model": str(cfg.model.get("path") or f"testbed:{cfg.experiment_name}"),
        "fit_seconds": round(seconds, 2),
        "schedule": rows,
        "trials": [{"alpha": t.alpha, "reached": t.reached, "flops_ratio": t.flops_ratio} for t in trials],
    }
    path = Path(cfg.output_dir, "recipe.json")
    write_json_atomically(path, content)
    summary = {k: content[k] for k in ("flops_budget", "alpha", "flops_ratio", "calibration_samples", "fit_seconds")}
    log_schedule(cfg, rows, summary)
    print(
        f"FitPrune recipe for a FLOPs budget of {cfg.fit.flops_budget:.2f}: alpha = {best.alpha:.2f}, "
        f"{best.flops_ratio:.3f} of the unpruned prefill FLOPs on {content['calibration_samples']} "
        f"calibration samples, fitted in {seconds:.1f} s"
    )
    print("| layer | deleted after it | visual tokens it processes |\n|---|---|---|")
    for row in rows:
        print(f"| {row['layer']} | {row['deleted']} | {row['visual_tokens']:.1f} |")
    print(f"recipe written to {path}")
    return content
