"""ATP on tiny Qwen2.5-VL / Qwen3-VL with per-image grids: the modules train a few steps in mask mode;
then, in drop mode, the first module keeps exactly the tokens its rule keeps when recomputed from
HF's own eager attentions and each image's own grid (read from image_grid_thw, plain loops) with
the thresholds it chose per instance; drop equals mask at every kept position, and a ragged batch
equals its batch-1 runs."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.token.atp import SAP_FLOOR, SAP_LEVELS, ATPPruner, atp_losses
from tests.qwen_inputs import IMAGE, qwen_batch, qwen_model

RAGGED = [(2, [(8, 8), (4, 6)], 3), (3, [], 6), (1, [(16, 8)], 2)]  # 22, 0 and 32 image tokens (grid 8 x 4)
LAYERS = [1, 3]


def sap_by_loops(grid_thw: list[list[int]]) -> list[float]:
    """SAP score of every image token of the given images, in order, from each image's own grid."""
    scores = []
    for _, h, w in grid_thw:
        rows, cols = h // 2, w // 2
        for row in range(rows):
            for col in range(cols):
                level = next((v for s, v in SAP_LEVELS if row % s == 0 and col % s == 0), SAP_FLOOR)
                scores.append(level)
    return scores


def first_module_by_loops(model, sample: dict, theta: tuple[float, float]) -> list[int]:
    """Image-token numbers the first module keeps in one unpadded sample: S_self[j] = mean over the later
    image tokens i of A[i, j], S_cross[j] = mean over the instruction tokens (after the last image token)
    of A[i, j], A = layer LAYERS[0] - 1's eager attention averaged over heads, each divided by its max
    over the sample's image tokens; keep iff (S_self + S_cross) / 2 > theta_r or SAP > theta_s."""
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attention = model(**sample, output_attentions=True).attentions[LAYERS[0] - 1][0].mean(0)
    model.set_attn_implementation(implementation)
    tokens = sample["input_ids"][0]
    image = (tokens == IMAGE).nonzero()[:, 0].tolist()
    instruction = [p for p in range(len(tokens)) if p > max(image)]
    s_self = [float(attention[image[n + 1 :], j].mean()) if n + 1 < len(image) else 0.0 for n, j in enumerate(image)]
    s_cross = [float(attention[instruction, j].mean()) for j in image]
    s_self = [s / max(s_self) for s in s_self]
    s_cross = [s / max(s_cross) for s in s_cross]
    sap = sap_by_loops(sample["image_grid_thw"].tolist())
    return [n for n in range(len(image)) if (s_self[n] + s_cross[n]) / 2 > theta[0] or sap[n] > theta[1]]


def train_a_few_steps(model, steps: int = 3) -> ATPPruner:
    """ATP modules started inside the score range, trained in mask mode on the LM + ATP losses."""
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=LAYERS, hidden=16)
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.5)
            module.spatial_head.bias.fill_(0.0)  # theta_s near 0.5: the stride-4 level counts
            module.trunk[0].weight.normal_()
    model.requires_grad_(False)
    atp.apply(model, pruner.train(), mode="mask")
    batch = qwen_batch(RAGGED)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-2] = -100  # the last two tokens are the answer
    optimizer = torch.optim.AdamW(pruner.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in pruner.parameters()]
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        terms = atp_losses(pruner, atp.stats(model).num_visual, 0.25 * atp.stats(model).num_visual.float())
        optimizer.zero_grad()
        (loss + terms["atp"] + terms["target"]).backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, pruner.parameters()))  # it trained
    atp.remove(model)
    return pruner.eval()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_trained_atp_prunes_by_its_rule_on_each_images_grid(family):
    model = qwen_model(family)
    pruner = train_a_few_steps(model)
    runs = {}
    for mode in ("drop", "mask"):
        atp.apply(model, pruner, mode=mode)
        with torch.no_grad():
            logits = model(**qwen_batch(RAGGED)).logits
        runs[mode] = (logits, atp.stats(model), {k: v.clone() for k, v in pruner.thresholds.items()})
        atp.remove(model)
    logits, stats, thresholds = runs["drop"]
    first = LAYERS[0]
    assert not torch.allclose(thresholds[first][0], thresholds[first][2])  # thresholds per instance
    for b, spec in enumerate(RAGGED):
        single = qwen_batch([spec], [b])
        atp.apply(model, pruner, mode="drop")
        with torch.no_grad():
            alone = model(**single).logits[0]
        alone_stats = atp.stats(model)
        atp.remove(model)
        if spec[1]:
            theta = tuple(float(t) for t in thresholds[first][b])
            assert stats.kept[first][b].tolist() == first_module_by_loops(model, single, theta), b
        for layer in LAYERS:
            assert stats.kept[layer][b].tolist() == alone_stats.kept[layer][0].tolist()
            assert stats.kept[layer][b].tolist() == runs["mask"][1].kept[layer][b].tolist()
        # logits at every position that survives to the end: text, and the image tokens kept by the last module
        length = single["input_ids"].shape[1]
        offset = logits.shape[1] - length
        image = (single["input_ids"][0] == IMAGE).nonzero()[:, 0]
        survivors = [p for p in range(length) if p not in image.tolist()]
        survivors += [int(image[n]) for n in stats.kept[LAYERS[-1]][b].tolist()]
        rows = torch.tensor(sorted(survivors))
        assert_close(logits[b, offset + rows], runs["mask"][0][b, offset + rows], rtol=1e-4, atol=1e-5)
        assert_close(logits[b, offset + rows], alone[rows], rtol=1e-4, atol=1e-5)
    kept = stats.visual_tokens[:, -1]
    assert 0 < int(kept[0]) < 22 and 0 < int(kept[2]) < 32  # it prunes, and keeps something
