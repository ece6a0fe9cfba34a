"""Joint pruning on ShapesVQA: the testbed VLM's language model pruned structurally (heads and MLP
channels) by a two-stage baseline, then visual tokens pruned by FastV at run time, next to each
pruning alone.

Rows: the dense model unpruned; FastV alone; the structurally pruned LLM alone; both. The
structural mask comes from `--method` (a calibrated baseline of `atp.structural.baselines`)
calibrated on `--calibration` training prompts of the VLM itself (images included), with no
fine-tuning afterwards; the pruned VLM is exported and loaded back with `from_pretrained`, as a
user would. FLOPs and KV cache are analytic (atp's accounting, per-layer widths included) and
relative to the dense model with every token; "LLM params" counts the decoder layers.

    python benchmarks/joint_pruning.py --base checkpoints/shapes_base/model --max-samples 200
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

import atp
from atp.data.llava_format import prompt_loader
from atp.evaluation import evaluate
from atp.metrics import kv_cache_bytes, prefill_flops
from atp.models.build import load_llava
from atp.structural import decoder_parameters, remove_structures
from atp.structural.baselines import CALIBRATED, baseline_mask


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="checkpoints/shapes_base/model")
    parser.add_argument("--data", default="checkpoints/data/shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--method", default="flap", choices=CALIBRATED, help="structural baseline")
    parser.add_argument("--prune-ratio", type=float, default=0.2, help="share of the decoder layers' parameters")
    parser.add_argument("--calibration", type=int, default=32, help="training prompts the baseline calibrates on")
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--keep-tokens", type=int, default=64, help="visual tokens FastV keeps")
    parser.add_argument("--out", default="checkpoints/joint")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, processor = load_llava(args.base, setting="--base")
    model.eval()
    data = Path(args.data)
    loader = prompt_loader(data / f"{args.split}.json", data / "images", processor, args.max_samples, 50)
    calibration = [
        {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        for batch in prompt_loader(data / "train.json", data / "images", processor, args.calibration, 8)
    ]
    dense_config = copy.deepcopy(model.config)  # remove_structures changes the model's config in place
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
    mask = baseline_mask(model, args.method, args.prune_ratio, calibration=calibration)
    export = Path(args.out, f"{args.method}_{args.prune_ratio:g}")
    remove_structures(model, mask).save_pretrained(export)
    processor.save_pretrained(export)
    pruned = LlavaForConditionalGeneration.from_pretrained(export).eval()
    kept = decoder_parameters(pruned.config)
    run(f"{args.method} -{args.prune_ratio:.0%} LLM", pruned, None, kept)
    run(f"{args.method} -{args.prune_ratio:.0%} LLM + fastv {args.keep_tokens}", pruned, fastv(), kept)

    print(
        f"\nShapesVQA {args.split}, {len(loader.dataset)} questions; {args.method} calibrated on "
        f"{args.calibration} training prompts, no fine-tuning; FLOPs and KV relative to the dense model\n"
    )
    print("| method | accuracy | visual tokens / layer | LLM params | prefill FLOPs | KV cache |")
    print("|---|---|---|---|---|---|")
    for label, accuracy, tokens, parameters, flops, kv in rows:
        print(f"| {label} | {100 * accuracy:.1f} | {tokens:.1f} | {parameters:.1%} | {flops:.1%} | {kv:.1%} |")


if __name__ == "__main__":
    main()
