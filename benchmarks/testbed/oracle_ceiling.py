"""How much accuracy can any pruner keep at a given cut? An oracle that knows where the objects are.

ShapesVQA's generator knows which visual tokens cover an object (any non-black pixel in the
token's 14 x 14 patch). The oracle keeps exactly those tokens (a different count per image)
with one cut before --layers; at each cut it is compared with a random subset of the same
count per image and with FastV at the same average keep ratio, all on the unpruned base
model in drop mode. The object tokens are not the best possible choice (a model may read
the background too), but when neither they nor the other selections keep the base model's
accuracy at a budget, the loss comes from removing tokens the frozen model was never trained
without rather than from ranking them badly.

    python benchmarks/testbed/oracle_ceiling.py --base checkpoints/shapes_base/init01/model --layers 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from atp_signals import object_tokens

import atp
from atp.data.llava_format import prompt_loader
from atp.evaluation import evaluate, markdown_table
from atp.models.build import load_llava
from atp.runtime.pruner import PruneContext, TokenPruner


class GroundTruthPruner(TokenPruner):
    """One cut before `layer`: keep the visual tokens that cover an object ("objects"), or a
    uniformly random subset of the same size per image ("random"). `current` holds the
    [grid * grid] bool object maps of the batch being run (set by `BatchObjects`)."""

    name = "ground_truth"

    def __init__(self, layer: int, keep: str = "objects", seed: int = 0) -> None:
        super().__init__([layer])
        self.keep, self.seed = keep, seed
        self.current: list[np.ndarray] = []

    def prune(self, ctx: PruneContext) -> torch.Tensor:
        keep = torch.zeros_like(ctx.visual)
        for b, objects in enumerate(self.current):
            slots = ctx.visual[b].nonzero()[:, 0]
            on_object = torch.from_numpy(objects)[ctx.visual_index[b, slots]]
            if self.keep == "objects":
                keep[b, slots[on_object]] = True
            else:
                generator = torch.Generator().manual_seed(self.seed)
                chosen = torch.randperm(len(slots), generator=generator)[: int(on_object.sum())]
                keep[b, slots[chosen]] = True
        return keep


class BatchObjects:
    """Iterates `loader` and hands each batch's object maps to `pruner` before the batch runs."""

    def __init__(self, loader, objects: dict[str, np.ndarray], pruner: GroundTruthPruner) -> None:
        self.loader, self.objects, self.pruner = loader, objects, pruner

    def __iter__(self):
        for batch in self.loader:
            self.pruner.current = [self.objects[i] for i in batch["id"]]
            yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="checkpoints/shapes_base/model")
    parser.add_argument("--data", default="checkpoints/data/shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    model, processor = load_llava(args.base)
    model.eval()
    loader = prompt_loader(
        Path(args.data, f"{args.split}.json"), Path(args.data, "images"), processor, args.max_samples
    )
    grid, patch = processor.image_processor.crop_size["height"] // processor.patch_size, processor.patch_size
    objects = {
        r["id"]: object_tokens(loader.dataset.image_folder / r["image"], grid, patch) for r in loader.dataset.records
    }
    share = float(np.mean([o.mean() for o in objects.values()]))
    results = [evaluate(model, processor, loader, "unpruned")]
    for layer in args.layers:
        for keep in ("objects", "random"):
            pruner = GroundTruthPruner(layer, keep).eval()
            atp.apply(model, pruner, mode="drop")
            label = "oracle: the object tokens" if keep == "objects" else "random, same count per image"
            results.append(
                evaluate(model, processor, BatchObjects(loader, objects, pruner), f"{label}, before {layer}")
            )
            atp.remove(model)
        if layer >= 1:
            atp.apply(model, atp.build_pruner("fastv", layer=layer, keep_ratio=share).eval(), mode="drop")
            results.append(evaluate(model, processor, loader, f"fastv keep {share:.3f}, before {layer}"))
            atp.remove(model)
    print(
        f"\n{args.base}, ShapesVQA {args.split} ({len(loader.dataset)} questions); object tokens {100 * share:.1f} %\n"
    )
    print(markdown_table(results))
    base = results[0].accuracy
    for r in results[1:]:
        print(f"{r.method}: retention {100 * r.accuracy / max(base, 1e-9):.1f} %")


if __name__ == "__main__":
    main()
