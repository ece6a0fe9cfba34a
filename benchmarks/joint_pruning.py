"""Joint pruning on ShapesVQA: the testbed VLM's language model pruned structurally (attention
groups and MLP channels), then visual tokens pruned by FastV at run time, next to each pruning alone.

Rows: the dense model unpruned; FastV alone; per structural method of `--methods`, the pruned LLM
alone and with FastV. `atp`: ATP's one-stage search (StructuralPruningModule: generator, LoRA and
group lasso) on the VLM's own image prompts (`train_single.json`, StructuralLlavaDataModule);
a calibrated baseline (`flap`, ...): its mask from `--calibration` training prompts of the VLM
(images included), then, with `--epochs` > 0, the same LoRA steps as ATP on that fixed mask. The
pruned VLM is exported and loaded back with `from_pretrained`, as a user would. FLOPs and KV
cache are analytic (atp's accounting, per-layer widths included) and relative to the dense model
with every token; "LLM params" counts the decoder layers.

    python benchmarks/joint_pruning.py --base checkpoints/shapes_base/model --max-samples 200
    python benchmarks/joint_pruning.py --methods flap --epochs 0  # the calibrated mask alone, no LoRA
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import lightning as L
import torch
from transformers import LlavaForConditionalGeneration

import atp
from atp.data.llava_format import prompt_loader
from atp.evaluation import evaluate
from atp.lit.data import StructuralLlavaDataModule
from atp.lit.structural import StructuralPruningModule
from atp.metrics import kv_cache_bytes, prefill_flops
from atp.models.build import load_llava
from atp.structural import decoder_parameters, remove_structures
from atp.structural.baselines import CALIBRATED, baseline_mask

METHODS = ("atp", *CALIBRATED)


@torch.inference_mode()
def dense_relative_costs(model, loader, dense_config) -> tuple[float, float]:
    """(FLOPs, KV bytes) of `model` as it runs now (pruner attached or not) over the loader's
    prompts, each divided by the dense model's with every token."""
    flops = dense_flops = kv = dense_kv = 0.0
    pruned = getattr(model, "_atp_runtime", None) is not None
    for batch in loader:
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        stats = atp.stats(model) if pruned else None
        lengths = batch["attention_mask"].sum(1)
        layers = dense_config.get_text_config().num_hidden_layers
        every_token = lengths[:, None].expand(-1, layers)
        tokens = stats.tokens if stats is not None else every_token
        flops += float(prefill_flops(model.config, tokens).sum())
        kv += float(kv_cache_bytes(model.config, tokens).sum())
        dense_flops += float(prefill_flops(dense_config, every_token).sum())
        dense_kv += float(kv_cache_bytes(dense_config, every_token).sum())
    return flops / dense_flops, kv / dense_kv


def structurally_pruned(model, processor, method: str, args, calibration: list[dict]) -> tuple[Path, dict]:
    """Prune a copy of `model`'s language model with `method`; export it with the processor.
    Returns (export directory, what the search did)."""
    model = copy.deepcopy(model)
    fixed = None if method == "atp" else baseline_mask(model, method, args.prune_ratio, calibration=calibration)
    export = Path(args.out, f"{method}_{args.prune_ratio:g}")
    if args.epochs == 0 and fixed is not None:
        remove_structures(model, fixed).save_pretrained(export)
        processor.save_pretrained(export)
        return export, {}
    data = Path(args.data)
    datamodule = StructuralLlavaDataModule(
        processor, str(data / "train_single.json"), str(data / "val.json"), str(data / "images"),
        batch_size=args.batch_size, max_train_samples=args.train_samples, held_out_fraction=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    module = StructuralPruningModule(
        model, prune_ratio=args.prune_ratio, control_epochs=args.control_epochs, generator_lr=args.generator_lr,
        lora_lr=args.lora_lr, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lasso_eta=args.lasso_eta,
        fixed_mask=fixed,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    log = module.search_log
    info = {"lora_steps": int(module.lora_steps), "generator_steps": int(module.generator_steps)}
    if log:
        info.update(live_share=(log[0]["generator/live_share"], log[-1]["generator/live_share"]))
    module.export(export)
    processor.save_pretrained(export)
    return export, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="checkpoints/shapes_base/model")
    parser.add_argument("--data", default="checkpoints/data/shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["atp", "flap"], choices=METHODS, help="structural methods")
    parser.add_argument("--prune-ratio", type=float, default=0.2, help="share of the decoder layers' parameters")
    parser.add_argument("--calibration", type=int, default=32, help="training prompts a baseline calibrates on")
    parser.add_argument("--train-samples", type=int, default=400, help="train_single.json prompts for LoRA / search")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="LoRA epochs for every method (0: baselines untuned)")
    parser.add_argument("--control-epochs", type=int, default=1, help="ATP's search epochs")
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lasso-eta", type=float, default=0.05)
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--keep-tokens", type=int, default=64, help="visual tokens FastV keeps")
    parser.add_argument("--out", default="checkpoints/joint")
    args = parser.parse_args()
    if "atp" in args.methods and not 0 < args.control_epochs <= args.epochs:
        raise SystemExit(f"atp needs 0 < --control-epochs ({args.control_epochs}) <= --epochs ({args.epochs}).")
    torch.manual_seed(0)

    model, processor = load_llava(args.base, setting="--base")
    model.eval()
    data = Path(args.data)
    loader = prompt_loader(data / f"{args.split}.json", data / "images", processor, args.max_samples, 50)
    calibration = [
        {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        for batch in prompt_loader(data / "train.json", data / "images", processor, args.calibration, 8)
    ]
    dense_config = copy.deepcopy(model.config)
    dense_parameters = decoder_parameters(dense_config)

    def fastv():
        return atp.build_pruner("fastv", layer=args.fastv_layer, keep_tokens=args.keep_tokens).eval()

    rows = []

    def run(label: str, vlm, pruner, parameters: int) -> None:
        if pruner is not None:
            atp.apply(vlm, pruner, mode="drop")
        result = evaluate(vlm, processor, loader, label, latency_batches=0)
        flops, kv = dense_relative_costs(vlm, loader, dense_config)
        if pruner is not None:
            atp.remove(vlm)
        rows.append((label, result.accuracy, result.avg_visual_tokens, parameters / dense_parameters, flops, kv))

    run("dense, unpruned", model, None, dense_parameters)
    run(f"fastv {args.keep_tokens} tokens", model, fastv(), dense_parameters)
    searches = {}
    for method in args.methods:
        export, searches[method] = structurally_pruned(model, processor, method, args, calibration)
        pruned = LlavaForConditionalGeneration.from_pretrained(export).eval()
        kept = decoder_parameters(pruned.config)
        text = pruned.config.text_config
        print(f"{method}: kv heads per layer {text.kv_heads_per_layer}, MLP widths {text.intermediate_size_per_layer}")
        run(f"{method} -{args.prune_ratio:.0%} LLM", pruned, None, kept)
        run(f"{method} -{args.prune_ratio:.0%} LLM + fastv {args.keep_tokens}", pruned, fastv(), kept)

    tuning = (
        f"LoRA rank {args.lora_rank} for {args.epochs} epochs of {args.train_samples} train_single prompts "
        f"(batch {args.batch_size}; ATP searches {args.control_epochs}), the same for every method"
        if args.epochs
        else "no fine-tuning"
    )
    print(
        f"\nShapesVQA {args.split}, {len(loader.dataset)} questions; baselines calibrated on {args.calibration} "
        f"training prompts; {tuning}; searches {searches}; FLOPs and KV relative to the dense model\n"
    )
    print("| method | accuracy | visual tokens / layer | LLM params | prefill FLOPs | KV cache |")
    print("|---|---|---|---|---|---|")
    for label, accuracy, tokens, parameters, flops, kv in rows:
        print(f"| {label} | {100 * accuracy:.1f} | {tokens:.1f} | {parameters:.1%} | {flops:.1%} | {kv:.1%} |")


if __name__ == "__main__":
    main()
