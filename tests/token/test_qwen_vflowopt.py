"""VFlowOpt on tiny Qwen2-VL, Qwen2.5-VL (a windowed vision layer) and Qwen3-VL keeps exactly the tokens a
brute-force recomputation keeps: the documented map written as loops over the stock tower's attention
(`tests.qwen_tower_reference`; a visual token sends the mean of its 4 patches' rows and receives the sum
over its 4 patches) and over the raw pixel rows (one grey histogram over the token's 4 patches, both
temporal frames), then the stages and the recycling cells, under sdpa and eager, drop and mask, for a
ragged batch (one prompt with two images of different sizes) and for each sample alone."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from tests.qwen_inputs import FAMILIES, PATCH, qwen_batch, qwen_model
from tests.qwen_tower_reference import brute_force_attention, check_kept_on_qwen

RAGGED = [(2, [(8, 8), (4, 4)], 3), (3, [(6, 10)], 1), (1, [(4, 8)], 2)]  # 16 + 4, 15 and 8 visual tokens
LAYERS = (0, 2)


def entropy_of_pixels(patches: list[torch.Tensor]) -> float:
    """Entropy (bits) of one grey histogram over all pixels of patches [3, p, p], pixel by pixel."""
    counts: dict[int, int] = {}
    for patch in patches:
        for y in range(patch.shape[1]):
            for x in range(patch.shape[2]):
                levels = [int(float(patch[c, y, x]) * 255) % 256 for c in range(3)]  # int() truncates, % wraps
                grey = round(sum(0.3333 * v for v in levels))
                counts[grey] = counts.get(grey, 0) + 1
    total = sum(counts.values())
    return -sum(n / total * math.log2(n / total + 1e-10) for n in counts.values())


def map_by_loops(probs: torch.Tensor, rows: torch.Tensor, t: float, alpha: float) -> list[float]:
    """One image's map: probs [H, T, T] its attention (processor order), rows [T, C * 2 * p * p] its pixels."""
    mean = probs.mean(0)
    n = probs.shape[1] // 4
    attn = [
        [sum(float(mean[4 * i + p, 4 * j + q]) for p in range(4) for q in range(4)) / 4 for j in range(n)]
        for i in range(n)
    ]
    received = [sum(attn[i][j] for i in range(n)) / n for j in range(n)]
    average = sum(received) / n
    chosen = [i for i in range(n) if received[i] > t * average] or list(range(n))
    context = [sum(attn[i][j] for i in chosen) / len(chosen) for j in range(n)]
    pixels = rows.view(-1, 3, 2, PATCH, PATCH)
    entropy = [entropy_of_pixels([pixels[4 * j + p, :, f] for p in range(4) for f in range(2)]) for j in range(n)]
    norm = sum(math.exp(e) for e in entropy)
    return [context[j] + alpha * math.exp(entropy[j]) / norm for j in range(n)]


def brute_force_vflowopt(model, batch, ratios, t: float, alpha: float, grid: float | None, layer: int):
    """({stage layer: per sample, the kept image-token numbers}, {layer: per sample, visual tokens processed})."""
    probs = brute_force_attention(model, batch, layer % len(model.model.visual.blocks))
    grids = batch["image_grid_thw"].tolist()
    starts = [0, *torch.tensor([h * w for _, h, w in grids]).cumsum(0).tolist()]
    kept, counts, image = {layer: [] for layer in LAYERS}, {layer: [] for layer in LAYERS}, 0
    for _, images, _ in RAGGED:
        score, place = [], []  # per token of the sample: map value, (image in sample, row, col)
        for k, (h, w) in enumerate(images):
            score += map_by_loops(probs[image], batch["pixel_values"][starts[image] : starts[image + 1]], t, alpha)
            place += [(k, u // (w // 2), u % (w // 2)) for u in range(h * w // 4)]
            image += 1
        n = len(score)
        order = sorted(range(n), key=lambda j: (-score[j], j))
        delete = round(n * (1 - ratios[0]))
        extra = int(n / (grid * grid)) if grid else 0
        alive = order[: n - delete - extra]
        hosts = []
        if grid:
            cells: dict[tuple, list[int]] = {}
            for j in order[n - delete - extra :]:
                k, row, col = place[j]
                cells.setdefault((k, math.floor(row / grid), math.floor(col / grid)), []).append(j)
            hosts = [max(members, key=lambda j: (score[j], -j)) for members in cells.values()]
        present = sorted(alive + hosts)
        kept[0].append(sorted(alive))
        counts[0].append(len(present))
        ranked = sorted(present, key=lambda j: (-score[j], j))
        second = sorted(ranked[: len(present) - round(len(present) * (1 - ratios[1]))])
        kept[2].append([j for j in second if j not in hosts])
        counts[2].append(len(second))
    return kept, counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grid", [None, 2.0])
def test_vflowopt_on_qwen_matches_brute_force(family, grid):
    model = qwen_model(family, attn="eager")
    ratios, t, alpha, layer = (0.5, 0.5), 1.0, 0.3, 0  # vision block 0: windowed on Qwen2.5-VL
    kept, counts = brute_force_vflowopt(model, qwen_batch(RAGGED), ratios, t, alpha, grid, layer)
    build = lambda: atp.build_pruner(  # noqa: E731
        "vflowopt",
        layers=LAYERS,
        keep_ratios=ratios,
        t=t,
        alpha=alpha,
        merge_grid=grid,
        setting=None,
        vision_layer=layer,
    )
    check_kept_on_qwen(model, RAGGED, build, kept, counts)
