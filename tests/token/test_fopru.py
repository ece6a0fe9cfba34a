"""FoPru: kept tokens against a brute-force recomputation, in plain loops, of the documented rule
from HF's own eager CLIP tower (its hidden states and q / k projections, the logits checked against
HF's `output_attentions`); the LLM then equals the stock LLM on the kept tokens; errors."""

from __future__ import annotations

import math

import pytest
import torch

import atp
from tests.conftest import make_batch, single
from tests.token.vision_reference import NUM_VISUAL, RAGGED, check_kept_and_logits, llava_without_cls, tower_outputs

GRID = 4  # the tiny LLaVA's 4 x 4 patch grid
DEPTH = 3  # vision layer -2 is layer 1: not the first


def patch_logits(model, sample, layer: int) -> list[list[float]]:
    """[N][N] head-averaged pre-softmax logits q_i . k_j / sqrt(hd) between the image's patches in vision
    layer `layer`, in plain loops over HF's q_proj / k_proj of the layer's input; each row's softmax over all
    tokens ([CLS] included) is checked against HF's eager `output_attentions` of that layer."""
    outputs = tower_outputs(model, sample)
    depth = len(outputs.attentions)
    layer = layer % depth
    module = model.model.vision_tower.encoder.layers[layer]
    heads = module.self_attn.num_heads
    with torch.no_grad():
        normed = module.layer_norm1(outputs.hidden_states[layer])[0]  # the layer's input, [T, dv]
        query, key = module.self_attn.q_proj(normed).tolist(), module.self_attn.k_proj(normed).tolist()
    tokens, width = len(query), len(query[0])
    hd = width // heads
    logits = [[[0.0] * tokens for _ in range(tokens)] for _ in range(heads)]
    for h in range(heads):
        for i in range(tokens):
            for j in range(tokens):
                dot = sum(query[i][h * hd + d] * key[j][h * hd + d] for d in range(hd))
                logits[h][i][j] = dot / math.sqrt(hd)
            top = max(logits[h][i])
            total = sum(math.exp(x - top) for x in logits[h][i])
            row = [math.exp(x - top) / total for x in logits[h][i]]
            torch.testing.assert_close(outputs.attentions[layer][0, h, i].double(), torch.tensor(row).double())
    n = tokens - 1
    return [[sum(logits[h][1 + i][1 + j] for h in range(heads)) / heads for j in range(n)] for i in range(n)]


def variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def brute_force_fopru(model, sample, total: int, strategy: str, significance: str, layer: int = -2):
    """(sorted kept image-token indices, the axis used) for one unpadded sample."""
    logits = patch_logits(model, sample, layer)
    n = len(logits)
    received = [sum(logits[i][j] for i in range(n)) / n for j in range(n)]
    given = [sum(logits[i][j] for j in range(n)) / n for i in range(n)]
    if significance == "auto":
        significance = "received" if variance(received) > variance(given) else "given"
    score = received if significance == "received" else given
    if strategy == "rank":
        return sorted(sorted(range(n), key=lambda j: (-score[j], j))[:total]), significance
    row_sum = [sum(score[r * GRID + c] for c in range(GRID)) for r in range(GRID)]
    ranked = sorted(range(GRID), key=lambda r: (-row_sum[r], r))
    full, rest = divmod(total, GRID)
    kept = [r * GRID + c for r in ranked[:full] for c in range(GRID)]
    if rest:
        partial = [ranked[full] * GRID + c for c in range(GRID)]
        kept += sorted(partial, key=lambda j: (-score[j], j))[:rest]
    return sorted(kept), significance


@pytest.mark.parametrize(
    "total,strategy,significance",
    [(5, "rank", "auto"), (9, "rank", "given"), (6, "row", "auto"), (8, "row", "received"), (11, "row", "given")],
)
def test_fopru_matches_brute_force(model_factory, total, strategy, significance):
    model = model_factory(attn_implementation="eager", vision_layers=DEPTH)
    batch = make_batch(RAGGED, seed=21)
    reference = [brute_force_fopru(model, single(batch, b), total, strategy, significance) for b in range(3)]
    expected = [kept for kept, _ in reference]
    assert all(len(kept) == total for kept in expected)
    check_kept_and_logits(
        model,
        batch,
        lambda: atp.build_pruner("fopru", keep_tokens=total, strategy=strategy, significance=significance),
        expected,
    )


def test_fopru_auto_takes_either_axis(model_factory):
    """The 'auto' rule picks the axis with the larger variance: both occur among these towers and
    layers, and the pruner agrees with the brute force on each."""
    batch = make_batch(RAGGED[:1], seed=21)
    used = set()
    for seed, layer in ((0, -2), (0, 0), (1, -2), (2, 0), (3, -1)):
        model = model_factory(attn_implementation="eager", vision_layers=DEPTH, seed=seed)
        kept, axis = brute_force_fopru(model, single(batch, 0), 5, "rank", "auto", layer)
        used.add(axis)
        atp.apply(model, atp.build_pruner("fopru", keep_tokens=5, vision_layer=layer))
        with torch.no_grad():
            model(**batch)
        assert atp.stats(model).kept[0][0].tolist() == kept, (seed, layer)
        atp.remove(model)
    assert used == {"received", "given"}, used


def test_fopru_budgets_config_and_errors(model_factory):
    from pathlib import Path

    from omegaconf import OmegaConf

    from atp.budget import budget_kwargs

    assert budget_kwargs("fopru", 64, 576, 32) == {"keep_tokens": 64}
    spec = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "conf/pruner/fopru.yaml"))
    pruner = atp.build_pruner(spec.pop("name"), **spec)
    assert (pruner.strategy, pruner.significance, pruner.vision_layer, pruner.budget.keep_tokens) == (
        "rank",
        "auto",
        -2,
        64,
    )
    with pytest.raises(ValueError, match="strategy must be one of"):
        atp.build_pruner("fopru", strategy="column")
    with pytest.raises(ValueError, match="significance must be one of"):
        atp.build_pruner("fopru", significance="cls")
    siglip = llava_without_cls()  # the LLaVA adapter maps visual tokens to tower tokens after a [CLS] only
    atp.apply(siglip, atp.build_pruner("fopru", keep_tokens=4))
    with pytest.raises(ValueError, match=r"SiglipVisionModel has no \[CLS\] token"), torch.no_grad():
        siglip(**make_batch(RAGGED))
    atp.remove(siglip)
    with pytest.raises(ValueError, match="vision layer 5 is outside the tower's 2 layers"):
        atp.apply(model_factory(), atp.build_pruner("fopru", keep_tokens=4, vision_layer=5))
    model = model_factory()
    atp.apply(model, atp.build_pruner("fopru", keep_tokens=NUM_VISUAL + 1))
    with pytest.raises(ValueError, match="keep_tokens=17 is more than the 16 visual tokens"), torch.no_grad():
        model(**make_batch(RAGGED))
    atp.remove(model)
