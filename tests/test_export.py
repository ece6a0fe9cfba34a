"""Export then atp.load_pruned gives the trained model's drop-mode logits; bad exports fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import atp
from atp.data.processor import build_processor
from atp.data.shapes import vocabulary
from atp.export import load_pruned, save_pruned
from atp.token.atp import ATPPruner
from tests.conftest import tiny_testbed_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    processor = build_processor(vocabulary(), image_size=56, patch_size=14)
    model = tiny_testbed_model(processor)
    pruner = ATPPruner(num_layers=4, layers=[1, 3], hidden=16).eval()
    with torch.no_grad():  # a "trained" state that prunes: thresholds inside the score range
        for module in pruner.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.2)
            module.spatial_head.bias.fill_(1.0)
            module.trunk[0].weight.normal_()
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[5, 6] + [image] * 16 + [9, 10, 11, 7], [0, 5] + [image] * 16 + [12, 13, 11, 7]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.randn(2, 3, 56, 56))
    return model, processor, pruner, inputs, tmp_path_factory.mktemp("export")


@pytest.mark.parametrize("reference_base", [False, True])
def test_export_round_trip_gives_the_same_logits(trained, reference_base):
    model, processor, pruner, inputs, root = trained
    base_dir = None
    if reference_base:
        base_dir = root / "base_model"
        model.save_pretrained(base_dir)
        processor.save_pretrained(base_dir)
    atp.apply(model, pruner, mode="drop")
    with torch.no_grad():
        expected = model(**inputs).logits
    kept = atp.stats(model).kept
    assert 0 < int(atp.stats(model).visual_tokens[:, -1].min()) < 16  # the pruner really prunes
    atp.remove(model)
    export = save_pruned(root / f"export_{reference_base}", model, processor, pruner, base_reference=base_dir)
    assert (export / "base").is_dir() != reference_base
    loaded, loaded_processor = load_pruned(export)
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert_close(got, expected)
    assert atp.runtime_of(loaded).mode == "drop"
    assert all(torch.equal(a, b) for layer in kept for a, b in zip(kept[layer], atp.stats(loaded).kept[layer]))
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_corrupt_or_mismatched_exports(trained, tmp_path):
    model, processor, pruner, _, _ = trained
    export = save_pruned(tmp_path / "export", model, processor, pruner)
    with pytest.raises(FileNotFoundError, match="is not an atp export"):
        load_pruned(tmp_path)
    config = json.loads((export / "atp_config.json").read_text())
    (export / "atp_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_pruned(export)
    config["kwargs"]["hidden"] = 32  # weights no longer match the pruner the config builds
    (export / "atp_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the 'atp' pruner"):
        load_pruned(export)
    config["kwargs"]["hidden"] = 16
    (export / "atp_config.json").write_text(json.dumps(config))
    (export / "pruner.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_pruned(export)
    (export / "pruner.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pruner.safetensors is missing"):
        load_pruned(export)


def test_failed_export_leaves_no_partial_directory(trained, tmp_path):
    model, processor, pruner, _, _ = trained

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(tmp_path / "export", model, Broken(), pruner)
    assert list(tmp_path.iterdir()) == []
