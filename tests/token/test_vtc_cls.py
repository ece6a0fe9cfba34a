"""VTC-CLS: kept tokens against a brute-force recomputation, in plain loops, of the documented
rule from HF's own eager CLIP `output_attentions`; the LLM then equals the stock LLM on them."""

from __future__ import annotations

import pytest
import torch

import atp
from tests.conftest import make_batch, single
from tests.token.vision_reference import NUM_VISUAL, RAGGED, check_kept_and_logits, llava_without_cls, tower_outputs


def brute_force_vtc_cls(model, sample, total: int, start_layer: int) -> list[int]:
    """Sorted indices of the image tokens VTC-CLS keeps for one unpadded sample."""
    attentions = tower_outputs(model, sample).attentions
    depth = len(attentions)
    start = start_layer + depth if start_layer < 0 else start_layer
    score = [0.0] * NUM_VISUAL
    for layer in range(start, depth - 1):  # the reference's attentions[start_layer:-1]
        heads = attentions[layer].shape[1]
        for j in range(NUM_VISUAL):
            score[j] += sum(float(attentions[layer][0, h, 0, 1 + j]) for h in range(heads)) / heads
    return sorted(sorted(range(NUM_VISUAL), key=lambda j: -score[j])[:total])


@pytest.mark.parametrize("total,start_layer", [(5, 0), (9, 1), (3, -3), (12, 2)])
def test_vtc_cls_matches_brute_force(model_factory, total, start_layer):
    model = model_factory(attn_implementation="eager", vision_layers=4)
    batch = make_batch(RAGGED, seed=13)
    expected = [brute_force_vtc_cls(model, single(batch, b), total, start_layer) for b in range(3)]
    check_kept_and_logits(
        model, batch, lambda: atp.build_pruner("vtc_cls", keep_tokens=total, start_layer=start_layer), expected
    )


def test_vtc_cls_errors(model_factory):
    for start_layer in (16, 1, -3):  # a 2-layer tower only scores layer 0
        with pytest.raises(ValueError, match=rf"start_layer={start_layer} leaves no layer to score"):
            atp.apply(model_factory(), atp.build_pruner("vtc_cls", start_layer=start_layer))
    with pytest.raises(ValueError, match=r"SiglipVisionModel has no \[CLS\] token"):
        atp.apply(llava_without_cls(), atp.build_pruner("vtc_cls", start_layer=0))
    model = model_factory()
    atp.apply(model, atp.build_pruner("vtc_cls", keep_tokens=17, start_layer=0))
    with pytest.raises(ValueError, match="keep_tokens=17 is more than the 16 visual tokens"):
        with torch.no_grad():
            model(**make_batch(RAGGED))
