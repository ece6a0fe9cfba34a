"""The kept-token history survives a checkpoint round trip (a resumed run's chart is whole)."""

from __future__ import annotations

import torch

from atp.lit.callbacks import TokenBudgetLogger


def test_token_history_round_trips_through_a_checkpoint(tmp_path):
    logger = TokenBudgetLogger()
    logger.history = {"kept_tokens_layer1": [(10, 300.5), (20, 250.25)], "target_tokens": [(10, 200.0), (20, 190.0)]}
    torch.save({"callbacks": {"TokenBudgetLogger": logger.state_dict()}}, tmp_path / "last.ckpt")
    resumed = TokenBudgetLogger()
    resumed.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["TokenBudgetLogger"])
    assert resumed.history == logger.history
