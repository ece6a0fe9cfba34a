"""What can ATP's threshold MLP and scores see in a model? Object-vs-background signals per layer.

For the unpruned model on held-out ShapesVQA, at the input of every decoder layer l >= 1:

- AUC(S_self), AUC(S_cross): how well layer l-1's attention scores rank the visual tokens that
  cover an object above the background ones (0.5: no better than chance; one value per
  image, averaged; a token covers an object if any of its 14 x 14 pixels is not black);
- Spearman with the object count, over images, of each `content_features` statistic of the
  visual hidden states entering layer l (mean and std of cos(h_j, h_bar), relative spread);
- Spearman with the object count of how many visual tokens pass S_r = (S_self + S_cross) / 2
  > theta for fixed thresholds (THRESHOLDS): could a redundancy threshold at this layer keep
  more tokens for busier images? (mean count in brackets)

Then, for each pruner in --pruners at --keep-tokens, the share of its kept visual tokens that
cover an object (against the share of all tokens that do).

    python benchmarks/testbed/atp_signals.py --base checkpoints/shapes_base/model --max-samples 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import atp
from atp.data.llava_format import prompt_loader
from atp.evaluation import spearman
from atp.models.build import load_llava
from atp.token.atp import ATPPruner, content_features

THRESHOLDS = (0.1, 0.3)


def object_tokens(image_path: Path, grid: int, patch: int) -> np.ndarray:
    """[grid * grid] bool, row-major: the patch holds a non-black pixel."""
    pixels = np.asarray(Image.open(image_path).convert("RGB").resize((grid * patch, grid * patch)))
    return pixels.reshape(grid, patch, grid, patch, 3).max(axis=(1, 3, 4)).flatten() > 0


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count one half."""
    pos, neg = score[positive][:, None], score[~positive][None]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="checkpoints/shapes_base/model")
    parser.add_argument("--data", default="checkpoints/data/shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--pruners", nargs="*", default=["fastervlm", "visionzip", "divprune", "spatial"])
    parser.add_argument("--keep-tokens", type=int, default=64)
    args = parser.parse_args()

    model, processor = load_llava(args.base)
    model.eval()
    num_layers = model.config.text_config.num_hidden_layers
    loader = prompt_loader(
        Path(args.data, f"{args.split}.json"), Path(args.data, "images"), processor, args.max_samples
    )
    records = loader.dataset.records  # the loader's own order
    grid, patch = processor.image_processor.crop_size["height"] // processor.patch_size, processor.patch_size
    objects = [object_tokens(loader.dataset.image_folder / r["image"], grid, patch) for r in records]

    probe = ATPPruner(num_layers=num_layers, layers=list(range(1, num_layers))).eval()  # keeps every token
    aucs: dict[tuple[int, str], list[float]] = {}
    content: dict[int, list[torch.Tensor]] = {}
    passing: dict[tuple[int, float], list[int]] = {}  # (layer, theta) -> tokens with S_r > theta, per image
    offset = [0]
    scores = probe.scores

    def record(ctx):  # wraps the probe's own scoring, so each module scores once
        s_self, s_cross, s_spatial = scores(ctx)
        content.setdefault(ctx.layer, []).append(content_features(ctx.hidden, (ctx.weight * ctx.visual).float()))
        for theta in THRESHOLDS:
            above = ((s_self + s_cross) / 2 > theta) & ctx.visual
            passing.setdefault((ctx.layer, theta), []).extend(above.sum(1).tolist())
        for b in range(ctx.visual.shape[0]):
            covered = objects[offset[0] + b][ctx.visual_index[b][ctx.visual[b]].numpy()]
            if covered.all() or not covered.any():
                continue
            for name, score in (("S_self", s_self), ("S_cross", s_cross)):
                aucs.setdefault((ctx.layer, name), []).append(auc(score[b][ctx.visual[b]].numpy(), covered))
        return s_self, s_cross, s_spatial

    probe.scores = record
    atp.apply(model, probe, mode="drop")
    with torch.inference_mode():
        for batch in loader:
            model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
            offset[0] += len(batch["id"])
    counts = [r["num_objects"] for r in records]
    print(f"{args.base} on {len(records)} {args.split} images\n")
    above = " | ".join(f"#(S_r > {theta})" for theta in THRESHOLDS)
    print(
        "| layer | AUC S_self (layer l-1) | AUC S_cross (layer l-1) | Spearman: mean cos | std cos | relative spread "
        f"| {above} |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(THRESHOLDS))
    for layer in probe.layers:
        stats = torch.cat(content[layer]).T.tolist()
        rho = " | ".join(f"{spearman(column, counts):.2f}" for column in stats)
        self_auc, cross_auc = np.mean(aucs[(layer, "S_self")]), np.mean(aucs[(layer, "S_cross")])
        kept = " | ".join(
            f"{spearman(passing[(layer, t)], counts):.2f} ({np.mean(passing[(layer, t)]):.0f})" for t in THRESHOLDS
        )
        print(f"| {layer} | {self_auc:.2f} | {cross_auc:.2f} | {rho} | {kept} |")
    atp.remove(model)
    print(
        f"\nShare of kept visual tokens on objects at {args.keep_tokens} kept (all tokens: "
        f"{100 * np.mean([o.mean() for o in objects]):.1f} %)\n"
    )
    print("| pruner | first layer without the pruned tokens | kept visual tokens | on objects |")
    print("|---|---|---|---|")
    for name in args.pruners:
        atp.apply(model, atp.build_pruner(name, keep_tokens=args.keep_tokens).eval(), mode="drop")
        shares, kept_counts, start = [], [], 0
        with torch.inference_mode():
            for batch in loader:
                model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
                kept = atp.stats(model).kept
                first = min(kept)
                for b, indices in enumerate(kept[first]):
                    shares.append(objects[start + b][indices.numpy()].mean())
                    kept_counts.append(len(indices))
                start += len(batch["id"])
        atp.remove(model)
        print(f"| {name} | {first} | {np.mean(kept_counts):.1f} | {100 * np.mean(shares):.1f} % |")


if __name__ == "__main__":
    main()
