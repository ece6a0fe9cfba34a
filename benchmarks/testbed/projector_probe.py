"""Can one attention head read the testbed's image features? Raw vs standardised projector.

For each scene and each colour held by exactly one shape, the task is the position question
("is the <colour> shape on the left or right ?"): a learned query per colour attends over
the 576 projected image tokens of the frozen testbed tower and projector, and a small MLP
reads left/right from the pooled value. Prints held-out accuracy during training for the
projector's HF initialisation and for `projector_init=standardised`.

    python benchmarks/testbed/projector_probe.py --scenes 3000 --steps 500
"""

from __future__ import annotations

import argparse
import random

import torch
from torch import nn

from atp.data.processor import build_processor
from atp.data.shapes import COLORS, IMAGE_SIZE, render, sample_scene, vocabulary
from atp.models.build import build_testbed_llava


@torch.no_grad()
def image_features(model, processor, scenes: list, chunk: int = 100) -> torch.Tensor:
    """[N, 576, D] the LLM's image inputs for `scenes`."""
    out = []
    for i in range(0, len(scenes), chunk):
        pixels = processor.image_processor([render(s) for s in scenes[i : i + chunk]], return_tensors="pt")
        out += model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    return torch.stack(out)


def position_questions(count: int) -> tuple[list, list[tuple[int, int, int]]]:
    """`count` seeded scenes and, shuffled, one (scene index, colour index, 0 left / 1 right)
    per colour held by exactly one shape in its scene."""
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(count)]
    colours = list(COLORS)
    examples = [
        (i, colours.index(o.color), int(o.center[0] >= IMAGE_SIZE // 2))
        for i, scene in enumerate(scenes)
        for o in scene
        if sum(p.color == o.color for p in scene) == 1
    ]
    random.Random(0).shuffle(examples)
    return scenes, examples


class AttentionReadout(nn.Module):
    """colour [B] + tokens [B, T, D] -> left/right logits [B, 2] through one attention head."""

    def __init__(self, dim: int, colours: int) -> None:
        super().__init__()
        self.query = nn.Embedding(colours, dim)
        self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.Linear(2 * dim, 64), nn.GELU(), nn.Linear(64, 2))

    def forward(self, colour: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query(colour)
        weights = torch.softmax((self.key(tokens) @ query[:, :, None])[..., 0] / tokens.shape[-1] ** 0.5, -1)
        pooled = (weights[..., None] * self.value(tokens)).sum(1)
        return self.out(torch.cat([pooled, query], -1))


def fit_and_score(
    parameters: list[nn.Parameter], predict, examples: list, steps: int, every: int, eval_chunk: int = 1000
) -> list[float]:
    """Adam (lr 1e-3, batch 64) on examples[1000:]; held-out accuracy (%) on examples[:1000]
    every `every` steps. predict(rows) -> (logits [B, 2], side [B]); held-out rows are scored
    `eval_chunk` at a time."""
    optimizer = torch.optim.Adam(parameters, 1e-3)
    held_out, train = examples[:1000], examples[1000:]
    rng, accuracies = random.Random(0), []
    for step in range(1, steps + 1):
        logits, side = predict(rng.sample(train, 64))
        loss = nn.functional.cross_entropy(logits, side)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                chunks = (predict(held_out[i : i + eval_chunk]) for i in range(0, len(held_out), eval_chunk))
                right = sum((logits.argmax(-1) == side).sum().item() for logits, side in chunks)
            accuracies.append(100 * right / len(held_out))
    return accuracies


def probe(features: torch.Tensor, examples: list, steps: int, every: int) -> list[float]:
    torch.manual_seed(0)
    readout = AttentionReadout(features.shape[-1], len(COLORS))

    def predict(rows):
        image, colour, side = (torch.tensor(column) for column in zip(*rows))
        return readout(colour, features[image]), side

    return fit_and_score(list(readout.parameters()), predict, examples, steps, every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=125)
    args = parser.parse_args()
    processor = build_processor(vocabulary())
    scenes, examples = position_questions(args.scenes)
    steps = list(range(args.every, args.steps + 1, args.every))
    print(f"{len(examples)} position questions on {args.scenes} scenes; held-out accuracy (%) after Adam steps\n")
    print("| projector_init | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for init in ("random", "standardised"):
        model = build_testbed_llava(processor, hidden_size=96, intermediate_size=192, num_layers=8, projector_init=init)
        accuracies = probe(image_features(model, processor, scenes), examples, args.steps, args.every)
        print(f"| {init} | " + " | ".join(f"{a:.1f}" for a in accuracies) + " |", flush=True)


if __name__ == "__main__":
    main()
