"""The testbed data is (re)generated exactly when its configured sizes change."""

from __future__ import annotations

import json

from atp.lit.data import ensure_shapes_dataset


def _turns(root) -> set[int]:
    return {len(r["conversations"]) // 2 for r in json.loads((root / "train.json").read_text())}


def test_changing_a_size_regenerates_and_switching_back_does_too(tmp_path):
    ensure_shapes_dataset(str(tmp_path), 4, 2, 2, questions_per_image=2)
    assert _turns(tmp_path) <= {1, 2} and 2 in _turns(tmp_path)
    ensure_shapes_dataset(str(tmp_path), 4, 2, 2, questions_per_image=5)
    assert 5 in _turns(tmp_path)
    # the 2-question marker must not survive the rewrite: back to 2 questions regenerates
    ensure_shapes_dataset(str(tmp_path), 4, 2, 2, questions_per_image=2)
    assert max(_turns(tmp_path)) == 2
    assert len(list(tmp_path.glob(".complete-*"))) == 1
