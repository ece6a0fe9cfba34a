"""HiPrune on tiny Qwen2-VL, Qwen2.5-VL (a windowed object layer) and Qwen3-VL keeps exactly the tokens a
brute-force recomputation keeps: the official Qwen2.5-VL port's rule (per visual token, the tower's
attention averaged over heads, summed over all queries of the image and averaged over its 4 patches;
anchors, raster neighbours, registers) written as loops over the stock tower's attention
(`tests.qwen_tower_reference`), under sdpa and eager, drop and mask, for a ragged batch of 3 images of
different sizes and for each sample alone (drop and mask give the same logits)."""

from __future__ import annotations

import pytest
import torch

import atp
from atp.token.selection import kept_count
from tests.qwen_inputs import FAMILIES, qwen_batch, qwen_model
from tests.qwen_tower_reference import brute_force_attention, check_kept_on_qwen
from tests.runtime.family_checks import check_generate_identical_across_modes_and_cache

RAGGED = [(2, [(8, 8)], 3), (3, [(6, 10)], 1), (1, [(4, 8)], 2)]  # 16, 15 and 8 visual tokens


def reference_scores(probs: torch.Tensor) -> list[float]:
    """Per visual token of one image: the official port's score from the image's attention [H, T, T]."""
    heads, queries, _ = probs.shape
    return [
        sum(float(probs[h, i, 4 * u + p]) for h in range(heads) for i in range(queries) for p in range(4)) / (4 * heads)
        for u in range(queries // 4)
    ]


def brute_force_hiprune(objects: list[float], registers: list[float], cols: int, total: int, alpha: float) -> list[int]:
    tokens = len(objects)
    anchors = sorted(range(tokens), key=lambda j: -objects[j])[: round(total * alpha / 5)]
    chosen = {min(max(near, 0), tokens - 1) for i in anchors for near in (i, i - 1, i + 1, i - cols, i + cols)}
    rest = sorted((j for j in range(tokens) if j not in chosen), key=lambda j: -registers[j])
    return sorted(chosen | set(rest[: total - len(chosen)]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [dict(keep_tokens=6, alpha=1.0), dict(keep_tokens=None, keep_ratio=0.6, alpha=0.5)])
def test_hiprune_on_qwen_matches_brute_force(family, budget):
    batch = qwen_batch(RAGGED)
    grids = batch["image_grid_thw"].tolist()
    model = qwen_model(family, attn="eager")
    objects, registers = brute_force_attention(model, batch, 0), brute_force_attention(model, batch, 1)
    expected = []
    for b, (_, h, w) in enumerate(grids):
        tokens = h * w // 4
        total = budget.get("keep_tokens") or int(kept_count(torch.tensor([tokens]), budget["keep_ratio"])[0])
        scores = reference_scores(objects[b]), reference_scores(registers[b])
        expected.append(brute_force_hiprune(*scores, w // 2, total, budget["alpha"]))
    build = lambda: atp.build_pruner("hiprune", object_layer=1, register_layer=-1, **budget)  # noqa: E731
    check_kept_on_qwen(model, RAGGED, build, {0: expected})


def test_hiprune_on_qwen_refuses_several_images_per_prompt():
    model = qwen_model("qwen2_vl")
    atp.apply(model, atp.build_pruner("hiprune", keep_tokens=4, object_layer=1, register_layer=-1))
    try:
        with pytest.raises(ValueError, match="hiprune works on one image per prompt"), torch.no_grad():
            model(**qwen_batch([(2, [(8, 8), (4, 4)], 3)]))
    finally:
        atp.remove(model)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", ["hiprune", "holov", "vflowopt"])
def test_vision_side_pruners_generate_alike_across_modes_and_cache(family, name):
    """Greedy decoding after a vision-side selection (Qwen3-VL: deepstack rows dropped with their tokens)
    is the same in drop and mask mode, with and without the KV cache, and differs from the stock model."""
    settings = {
        "hiprune": dict(keep_tokens=4, object_layer=1, register_layer=-1),
        "holov": dict(keep_tokens=4),
        "vflowopt": dict(layers=[0, 2], keep_ratios=[0.25, 0.5], t=1.0, alpha=0.3, setting=None),
    }
    model = qwen_model(family)
    batch = qwen_batch(RAGGED)
    check_generate_identical_across_modes_and_cache(
        model, batch, build=lambda: atp.build_pruner(name, **settings[name])
    )


def test_pre_encoded_images_the_tower_did_not_run_on_are_refused():
    """Images encoded outside the runtime (`mm_encoder_outputs` the tower's hooks never saw) get a clear error,
    never the q/k captured from other images."""
    model = qwen_model("qwen2_vl")
    batch = qwen_batch(RAGGED)
    with torch.no_grad():
        encoded = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], return_dict=True
        )
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    atp.apply(model, atp.build_pruner("hiprune", keep_tokens=4, object_layer=1, register_layer=-1))
    try:
        with torch.no_grad():
            model(**batch)  # captures q/k of these images, released after the prefill
            with pytest.raises(RuntimeError, match="were not captured"):
                model(**inputs, mm_encoder_outputs={"image": encoded})
    finally:
        atp.remove(model)
