"""Does the LLM's initialisation decide how fast it learns to read the image? One Llama layer.

The same position question as `projector_probe.py` ("is the <colour> shape on the left or
right ?"), now answered by a stock HF `LlamaModel` with one decoder layer: the input is the
576 projected image tokens of the frozen testbed tower and projector followed by one token
for the colour, and a linear head reads left/right from the last hidden state. Everything
but the standard deviation of the LLM's weights (`model.text_init_std`) is fixed. Prints
held-out accuracy during training.

    python benchmarks/testbed/llm_init_probe.py --stds 0.02 0.1 --steps 200
"""

from __future__ import annotations

import argparse

import torch
from projector_probe import fit_and_score, image_features, position_questions
from torch import nn
from transformers import LlamaConfig, LlamaModel

from atp.data.processor import build_processor
from atp.data.shapes import COLORS, vocabulary
from atp.models.build import build_testbed_llava


def colour_position_reader(std: float, hidden: int, heads: int) -> tuple[LlamaModel, nn.Linear]:
    """A one-layer Llama (token ids 0..5: the colours) with weights ~ N(0, std^2), and a head."""
    config = LlamaConfig(
        vocab_size=len(COLORS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        initializer_range=std,
        max_position_embeddings=1024,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaModel(config), nn.Linear(hidden, 2)


def train(features: torch.Tensor, examples: list, std: float, steps: int, every: int) -> list[float]:
    """Held-out accuracy (%) every `every` Adam steps (batch 64, lr 1e-3)."""
    llm, head = colour_position_reader(std, features.shape[-1], heads=4)

    def predict(rows):
        image, colour, side = (torch.tensor(column) for column in zip(*rows))
        inputs = torch.cat([features[image], llm.embed_tokens(colour)[:, None]], 1)  # [B, 577, D]
        return head(llm(inputs_embeds=inputs).last_hidden_state[:, -1]), side

    return fit_and_score([*llm.parameters(), *head.parameters()], predict, examples, steps, every, eval_chunk=250)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.1])
    args = parser.parse_args()
    processor = build_processor(vocabulary())
    scenes, examples = position_questions(args.scenes)
    model = build_testbed_llava(processor, hidden_size=96, intermediate_size=192, num_layers=8)
    features = image_features(model, processor, scenes)
    steps = list(range(args.every, args.steps + 1, args.every))
    print(f"{len(examples)} position questions on {args.scenes} scenes; held-out accuracy (%) after Adam steps\n")
    print("| LLM weight std | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for std in args.stds:
        accuracies = train(features, examples, std, args.steps, args.every)
        print(f"| {std:g} | " + " | ".join(f"{a:.1f}" for a in accuracies) + " |", flush=True)


if __name__ == "__main__":
    main()
