"""Layout operations against brute-force Python loops."""

from __future__ import annotations

import torch

from atp.runtime.layout import compact_positions, left_filled_slots


def test_left_filled_slots_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(5, 11, generator=generator) > 0.4
    slot, filled = left_filled_slots(keep)
    width = int(keep.sum(1).max())
    assert slot.shape == filled.shape == (5, width)
    for b in range(5):
        expected = keep[b].nonzero()[:, 0].tolist()
        fill = width - len(expected)
        assert filled[b].tolist() == [False] * fill + [True] * len(expected)
        assert slot[b, fill:].tolist() == expected


def test_compact_positions_matches_a_loop():
    position = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6]])
    removed = torch.tensor([[False, False, False, True, False, True, True, False, False]])
    expected, shift = [], 0
    for p, r in zip(position[0].tolist(), removed[0].tolist()):
        expected.append(p - shift)
        shift += r
    assert compact_positions(position, removed)[0].tolist() == expected
