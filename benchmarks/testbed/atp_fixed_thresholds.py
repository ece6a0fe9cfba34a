"""Is it the learned thresholds or the scores? An exported ATP model with constant thresholds.

First, per module of the export as trained: the mean learned thresholds and the visual tokens
it keeps, each with its Spearman correlation with the object count over the images. Then
runs the export as trained, and with every module's threshold MLP replaced by a constant
(theta_r, theta_s) for each setting given, and prints accuracy, average visual tokens per
decoder layer and Spearman(kept tokens, objects) for each. If constant thresholds give a
high Spearman where the learned ones do not, the scores follow the object count and the
learned thresholds are what undoes it.

    python benchmarks/testbed/atp_fixed_thresholds.py --atp checkpoints/atp_llava_shapes/l13_seed1/export \\
        --setting "1:1.0,0.4 3:0.1,0.9" --setting "1:1.0,0.4 3:0.2,0.6"

A setting names every module: "layer:theta_r,theta_s" separated by spaces (theta_r 1.0 turns
the redundancy branch off; theta_s 0.4 keeps the stride-2 SAP grid, 0.6 stride 4, 0.9 stride 8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import atp
from atp.data.llava_format import prompt_loader
from atp.evaluation import evaluate, spearman


class ConstantThresholds(nn.Module):
    """Stands in for a ThresholdMLP: the same (theta_r, theta_s) for every instance."""

    def __init__(self, theta_r: float, theta_s: float) -> None:
        super().__init__()
        self.theta_r, self.theta_s = theta_r, theta_s

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 2] pre-sigmoid (theta_r, theta_s), as ThresholdMLP.logits gives them."""
        theta = torch.tensor([self.theta_r, self.theta_s], dtype=torch.float64)
        return torch.logit(theta).to(features).expand(features.shape[0], 2)


@torch.inference_mode()
def learned_decisions(model, loader) -> None:
    """Print, per module, theta_r, theta_s and the kept count: mean, range, Spearman with objects."""
    pruner = atp.runtime_of(model).pruner
    values: dict[str, list[float]] = {}
    objects: list[int] = []
    for batch in loader:
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}, logits_to_keep=1)
        objects += [int(n) for n in batch["num_objects"]]
        for layer in pruner.layers:
            values.setdefault(f"theta_r before layer {layer}", []).extend(pruner.thresholds[layer][:, 0].tolist())
            values.setdefault(f"theta_s before layer {layer}", []).extend(pruner.thresholds[layer][:, 1].tolist())
            values.setdefault(f"kept before layer {layer}", []).extend(pruner.soft_counts[layer].tolist())
    print("| learned, per image | mean | min | max | Spearman with objects |")
    print("|---|---|---|---|---|")
    for name, series in sorted(values.items(), key=lambda item: int(item[0].split()[-1])):
        rho = spearman(series, objects)
        rho = "-" if rho is None else f"{rho:.2f}"
        print(f"| {name} | {sum(series) / len(series):.3f} | {min(series):.3f} | {max(series):.3f} | {rho} |")


def parse_setting(text: str, layers: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    setting = {}
    for part in text.split():
        layer, thetas = part.split(":")
        theta_r, theta_s = (float(v) for v in thetas.split(","))
        setting[int(layer)] = (theta_r, theta_s)
    if sorted(setting) != sorted(layers):
        raise ValueError(f"--setting {text!r} names layers {sorted(setting)}; the export has modules before {layers}.")
    return setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atp", required=True, help="an export directory")
    parser.add_argument("--data", default="checkpoints/data/shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--setting", action="append", default=[])
    args = parser.parse_args()

    model, processor = atp.load_pruned(args.atp)
    loader = prompt_loader(
        Path(args.data, f"{args.split}.json"), Path(args.data, "images"), processor, args.max_samples
    )
    pruner = atp.runtime_of(model).pruner
    settings = [parse_setting(text, pruner.layers) for text in args.setting]
    print(f"\n{args.atp}, ShapesVQA {args.split} ({len(loader.dataset)} questions)\n")
    learned_decisions(model, loader)
    learned = dict(pruner.modules_by_layer)
    rows = [("learned thresholds", evaluate(model, processor, loader, "learned", latency_batches=1, latency_repeats=1))]
    for text, setting in zip(args.setting, settings):
        for layer, (theta_r, theta_s) in setting.items():
            pruner.modules_by_layer[str(layer)] = ConstantThresholds(theta_r, theta_s)
        rows.append((text, evaluate(model, processor, loader, text, latency_batches=1, latency_repeats=1)))
        pruner.modules_by_layer.update(learned)
    print()
    print("| thresholds (layer:theta_r,theta_s) | accuracy | avg visual tokens/layer | Spearman(tokens, objects) |")
    print("|---|---|---|---|")
    for name, result in rows:
        rho = "-" if result.spearman_tokens_objects is None else f"{result.spearman_tokens_objects:.2f}"
        print(f"| {name} | {100 * result.accuracy:.1f} | {result.avg_visual_tokens:.1f} | {rho} |")


if __name__ == "__main__":
    main()
