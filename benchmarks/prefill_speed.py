"""Prefill speed of the drop-mode runtime: measured vs analytic speedup, side by side.

A LLaVA whose language stack is shaped like LLaVA-1.5-7B's (hidden 4096, MLP 11008,
32 heads, vocab 32000) with fewer layers, a small CLIP tower on LLaVA-1.5's geometry
(336 px, patch 14: 576 visual tokens) and a prompt of LLaVA-1.5's template length.
`--family llava_next`: the same stack as LLaVA-NeXT-7B (Vicuna-7B) with its anyres layout
(LLaVA-NeXT's pinpoints) and one image of `--image-size` (default 500 x 672: a base view and
2 x 2 crops unpadded to 36 rows, 2,304 content tokens plus 36 newline tokens).
Every configuration runs in the same process, interleaved, median of repeats.

    python benchmarks/prefill_speed.py --layers 8 --repeats 5
    python benchmarks/prefill_speed.py --family llava_next --layers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import atp
from atp.metrics import cost_report
from atp.progress import progress
from atp.token.atp import ATPPruner

IMAGE_TOKEN = 31999
TEXT = dict(  # LLaVA-1.5-7B's and LLaVA-NeXT-7B's language stack (Vicuna-7B)
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's


def build_model(layers: int, attn: str, family: str = "llava"):
    text = LlamaConfig(num_hidden_layers=layers, **TEXT)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14
    )
    if family == "llava_next":
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS
        )
        model_class = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=576)
        model_class = LlavaForConditionalGeneration
    config._attn_implementation = config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    torch.manual_seed(0)
    return model_class(config).eval()


def build_inputs(model, system_tokens: int, question_tokens: int, image_size: tuple[int, int]) -> dict:
    """LLaVA-1.5's template: ~35 system/USER tokens, the image, the question and 'ASSISTANT:'. LLaVA-NeXT:
    the image's placeholders (newline tokens included) as many as the model's own features."""
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(3, 31000, (system_tokens,), generator=generator)
    after = torch.randint(3, 31000, (question_tokens,), generator=generator)
    extra = {}
    if isinstance(model, LlavaNextForConditionalGeneration):
        views = image_size_to_num_patches(image_size, model.config.image_grid_pinpoints, 336)
        pixels = torch.randn(1, views, 3, 336, 336, generator=generator)
        extra["image_sizes"] = torch.tensor([image_size])
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels, image_sizes=extra["image_sizes"])
        placeholders = int(features.pooler_output[0].shape[0])
    else:
        pixels, placeholders = torch.randn(1, 3, 336, 336, generator=generator), 576
    ids = torch.cat([torch.tensor([1]), before, torch.full((placeholders,), IMAGE_TOKEN), after])[None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, logits_to_keep=1, **extra)


def fixed_threshold_atp(num_layers: int, theta_r: float, theta_s: float) -> ATPPruner:
    """ATP modules at the default layers whose threshold MLPs output constant (theta_r, theta_s):
    untrained modules keep everything, and the probes cost the same whatever the thresholds."""
    pruner = atp.build_pruner("atp", num_layers=num_layers)
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            for head, theta in ((module.redundancy_head, theta_r), (module.spatial_head, theta_s)):
                head.weight.zero_()
                head.bias.fill_(torch.logit(torch.tensor(theta)).item())
    return pruner.eval()


def timed_prefill(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=["llava", "llava_next"], help="the VLM layout")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=(500, 672), metavar=("HEIGHT", "WIDTH"), help="llava_next's image"
    )
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (LLaVA-1.5-7B has 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median)")
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="fraction of the visual tokens kept")
    parser.add_argument("--layer", type=int, default=2, help="prune before this layer (FastV's K)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument(
        "--atp-theta",
        type=float,
        nargs=2,
        default=(0.5, 0.6),
        metavar=("THETA_R", "THETA_S"),
        help="constant ATP thresholds (0.6: the SAP branch keeps the stride-4 grid)",
    )
    parser.add_argument("--system-tokens", type=int, default=35)
    parser.add_argument("--question-tokens", type=int, default=30)
    args = parser.parse_args()

    model = build_model(args.layers, args.attn, args.family)
    inputs = build_inputs(model, args.system_tokens, args.question_tokens, tuple(args.image_size))
    config = model.config.text_config
    pruners = {
        "stock HF (no atp)": None,
        "atp runtime, none": atp.build_pruner("none"),
        f"fastv K={args.layer}": atp.build_pruner("fastv", layer=args.layer, keep_ratio=args.keep_ratio),
        f"random L={args.layer}": atp.build_pruner("random", layers=[args.layer], keep_ratio=args.keep_ratio),
        "atp (fixed thresholds)": fixed_threshold_atp(args.layers, *args.atp_theta),
    }
    times = {name: [] for name in pruners}
    scoring = {name: [] for name in pruners}
    reports = {}
    with torch.inference_mode():
        for repeat in progress(range(args.repeats + 1), "timing rounds"):  # the first warms up, discarded
            for name, pruner in pruners.items():
                if pruner is None:
                    atp.remove(model)
                else:
                    atp.apply(model, pruner, mode="drop")
                elapsed = timed_prefill(model, inputs)
                if pruner is not None:
                    stats = atp.stats(model)
                    reports[name] = (cost_report(config, stats), stats)
                    if repeat:
                        scoring[name].append(stats.scoring_seconds)
                if repeat:
                    times[name].append(elapsed)
    atp.remove(model)

    base = statistics.median(times["stock HF (no atp)"])
    visual = int(reports["atp runtime, none"][1].num_visual[0])
    shape = "LLaVA-NeXT-7B's shape, anyres" if args.family == "llava_next" else "LLaVA-1.5-7B's shape"
    print(
        f"\nPrefill, {args.layers} decoder layers of {shape}, {inputs['input_ids'].shape[1]} tokens "
        f"({visual} visual), keep {args.keep_ratio:.0%} of visual tokens, attn={args.attn}, drop mode, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print(
        "| method | visual tokens/layer | prefill s | measured speedup | analytic speedup | measured/analytic "
        "| scoring overhead | KV cache |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in pruners:
        median = statistics.median(times[name])
        measured = base / median
        if name not in reports:
            print(f"| {name} | {visual:.1f} | {median:.3f} | 1.00x | 1.00x | 1.000 | - | 100.0 % |")
            continue
        report, stats = reports[name]
        analytic = 1.0 / report.flops_ratio
        overhead = 100 * statistics.median(scoring[name]) / base
        print(
            f"| {name} | {float(stats.average_visual_tokens()[0]):.1f} | {median:.3f} | {measured:.2f}x "
            f"| {analytic:.2f}x | {measured / analytic:.3f} | {overhead:.2f} % | {100 * report.kv_ratio:.1f} % |"
        )
    print(
        "\nKV cache: bytes after prefill relative to unpruned. Scoring overhead: time inside the pruner "
        "(scores, probes) as % of the unpruned prefill."
    )


if __name__ == "__main__":
    main()
