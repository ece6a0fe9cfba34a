"""The export round trip every family's test runs: prune, export, `atp.load_pruned`, and compare the
model read back from disk with the one the export was written from (logits, kept tokens, greedy tokens)."""

from __future__ import annotations

import json

import torch

import atp
from atp.export import load_pruned, save_pruned
from atp.token.atp import ATPPruner


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


def check_export_round_trip(model, batch: dict, pruner, directory) -> str:
    """Run `pruner` on `model` in drop mode, export it (without a processor) to `directory`, load it back
    and assert the loaded model reproduces the original exactly. Returns the loaded runtime's
    position policy, for family-specific checks."""
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        expected = model(**batch).logits
    stats = atp.stats(model)
    kept, visual = stats.kept, stats.visual_tokens
    generated = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert int(visual[:, -1].sum()) < int(stats.num_visual.sum())  # really prunes
    policy = atp.runtime_of(model).position_policy
    atp.remove(model)
    export = save_pruned(directory, model, None, pruner)
    config = json.loads((export / "atp_config.json").read_text())
    assert config["pruner"] == pruner.name and config["processor"] is False
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
    return atp.runtime_of(loaded).position_policy
