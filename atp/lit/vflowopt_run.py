"""`python train.py experiment=vflowopt_shapes`: search VFlowOpt's settings and write them as JSON.

The job loads the model, takes `fit.calibration_samples` prompts (up to the first answer) from
`fit.calibration_json`, runs the flow-guided search (`atp.calibration.vflowopt`) for `fit.calls`
settings, prints the best one, logs it to the configured loggers and writes `<output_dir>/recipe.json`
atomically: the file `pruner=vflowopt pruner.recipe=...` reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from atp.calibration.vflowopt import VFlowOptSearch, average_share
from atp.lit.builders import build_loggers
from atp.lit.fitprune_run import calibration_setup, write_json_atomically


def run_vflowopt(cfg: DictConfig) -> dict:
    """Search, print, log and save the best setting; returns the JSON content written."""
    model, batches = calibration_setup(cfg)
    fit = cfg.fit
    start = time.perf_counter()
    space = OmegaConf.to_container(fit.space, resolve=True) if fit.get("space") is not None else None
    search = VFlowOptSearch(
        model, batches, list(fit.layers), fit.target, space, seed=int(fit.seed), vision_layer=int(fit.vision_layer)
    )
    best, trials = search.fit(int(fit.calls), int(fit.initial_points))
    seconds = time.perf_counter() - start
    layers = list(search.layers)
    content = {
        "recipe": best.recipe(layers, search.vision_layer),
        "similarity": best.similarity,
        "average_share": average_share(best.keep_ratios, layers, search.num_layers),
        "target": float(fit.target),
        "calibration_samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "calibration_json": str(fit.calibration_json),
        "model": str(cfg.model.get("path") or f"testbed:{cfg.experiment_name}"),
        "fit_seconds": round(seconds, 2),
        "trials": [{**t.recipe(layers, search.vision_layer), "similarity": t.similarity} for t in trials],
    }
    path = Path(cfg.output_dir, "recipe.json")
    write_json_atomically(path, content)
    summary = {k: content[k] for k in ("similarity", "average_share", "target", "calibration_samples", "fit_seconds")}
    for logger in build_loggers(cfg):
        logger.log_hyperparams(
            {**summary, **{f"recipe/{k}": str(v) for k, v in best.recipe(layers, search.vision_layer).items()}}
        )
        for step, trial in enumerate(trials):
            logger.log_metrics({"vflowopt/similarity": trial.similarity}, step=step)
        logger.save()
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
    print(
        f"VFlowOpt setting for an average share of {fit.target:.3f}: keep_ratios {best.keep_ratios}, "
        f"t = {best.t:.3f}, merge_grid = {best.merge_grid:.3f}, alpha = {best.alpha:.3f}; summed cosine similarity "
        f"{best.similarity:.4f} over {content['calibration_samples']} prompts, {len(trials)} settings, {seconds:.1f} s"
    )
    print(f"recipe written to {path}")
    return content
