"""evaluate.py's budget_tokens for the vision methods: the tower's depth reaches budget_kwargs, so
their CLIP-L vision layers are scaled to the tower, and the built pruner keeps the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import atp
from atp.lit.evaluate_run import budgeted_pruner_config
from atp.models.tiny import tiny_llava
from tests.conftest import GRID, VOCAB, make_batch

PRUNER_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "pruner"


@pytest.mark.parametrize(
    "name,scaled",
    [
        ("vtc_cls", {"start_layer": 0}),
        ("hiprune", {"object_layer": 1}),
        ("vispruner", {}),
        ("flowcut", {}),  # in-tower: the testbed's 2-layer tower, read at layer 0, is cut before layer 1
        ("zero_tprune", {}),
    ],
)
def test_budget_tokens_scale_vision_layers_to_the_tower(name, scaled):
    model = tiny_llava(grid=GRID, vocab_size=VOCAB, vision_layers=2)
    spec = OmegaConf.to_container(OmegaConf.load(PRUNER_CONFIGS / f"{name}.yaml"))
    cfg = OmegaConf.create({"pruner": spec, "budget_tokens": 4})
    config = budgeted_pruner_config(cfg, model, processor=None)
    assert config["keep_tokens"] == 4 and {k: config[k] for k in scaled} == scaled
    atp.apply(model, atp.build_pruner(config.pop("name"), **config))
    with torch.no_grad():
        model(**make_batch([(2, 3), (6, 1)]))
    assert atp.stats(model).visual_tokens[:, -1].tolist() == [4, 4]
