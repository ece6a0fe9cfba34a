"""Export then atp.load_pruned on tiny LLaVA-NeXT / LLaVA-OneVision: the model read back from disk gives the
same logits, kept tokens and greedy tokens as the model the export was written from."""

from __future__ import annotations

import json

import pytest
import torch

import atp
from atp.export import load_pruned, save_pruned
from atp.token.atp import ATPPruner
from tests.next_inputs import FAMILIES, SQUARE, TALL, WIDE, next_batch, next_model

RAGGED = [(2, [WIDE], 3), (3, [], 6), (1, [SQUARE], 2), (2, [TALL], 1)]  # anyres images of three layouts, none


def pruning_atp() -> ATPPruner:
    """An ATP pruner in a "trained" state that prunes: thresholds inside the score range."""
    torch.manual_seed(0)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], hidden=16).eval()
    with torch.no_grad():
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.2)
            module.spatial_head.bias.fill_(1.0)
            module.trunk[0].weight.normal_()
    return pruner


PRUNERS = {
    "fastv": lambda: atp.build_pruner("fastv", layer=2, keep_ratio=0.25),
    "pdrop": lambda: atp.build_pruner("pdrop", layers=[1, 2], keep_ratios=[0.5, 0.25]),
    "atp": pruning_atp,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_next_export_round_trip(family, name, tmp_path):
    model = next_model(family)
    batch = next_batch(model, RAGGED)
    pruner = PRUNERS[name]()
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        expected = model(**batch).logits
    kept = atp.stats(model).kept
    visual = atp.stats(model).visual_tokens
    generated = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert int(visual[:, -1].sum()) < int(visual[:, 0].sum())  # really prunes
    policy = atp.runtime_of(model).position_policy
    atp.remove(model)
    export = save_pruned(tmp_path / "export", model, None, pruner)
    config = json.loads((export / "atp_config.json").read_text())
    assert config["pruner"] == name and config["processor"] is False
    loaded, processor = load_pruned(export)
    assert processor is None and type(loaded) is type(model) and atp.runtime_of(loaded).mode == "drop"
    assert atp.runtime_of(loaded).position_policy == policy
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.equal(got, expected)
    assert torch.equal(atp.stats(loaded).visual_tokens, visual)
    for layer in kept:
        assert all(torch.equal(a, b) for a, b in zip(kept[layer], atp.stats(loaded).kept[layer]))
    assert torch.equal(loaded.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False), generated)
