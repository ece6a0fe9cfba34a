"""ShapesVQA: deterministic, and its answers agree with what is actually drawn."""

from __future__ import annotations

import numpy as np

from atp.data.shapes import COLORS, NUMBERS, generate_split


def connected_components(mask: np.ndarray) -> int:
    """Brute-force 4-connected component count of a boolean image."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_generation_is_deterministic():
    a_records, a_images = generate_split(12, seed=5)
    b_records, b_images = generate_split(12, seed=5)
    assert a_records == b_records
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_images, b_images))
    c_records, _ = generate_split(12, seed=6)
    assert c_records != a_records


def test_counts_match_the_drawn_objects():
    records, images = generate_split(40, seed=1)
    for record, image in zip(records, images):
        pixels = np.asarray(image)
        assert connected_components(pixels.max(-1) > 0) == record["num_objects"]
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        if question.endswith("how many shapes are there ?"):
            assert answer == NUMBERS[record["num_objects"]]
        for color, rgb in COLORS.items():
            if f"how many {color} shapes" in question:
                colored = (pixels == np.array(rgb)).all(-1)
                assert answer == NUMBERS[connected_components(colored)]


def test_question_types_rotate_and_object_counts_vary():
    records, _ = generate_split(50, seed=0)
    types = [r["question_type"] for r in records]
    assert set(types) == {"count", "color", "shape", "presence", "position"}
    assert len({r["num_objects"] for r in records}) >= 6
    assert all(len(r["conversations"]) == 2 and len(r["conversations"][1]["value"].split()) == 1 for r in records)


def test_multi_turn_training_records():
    records, _ = generate_split(10, seed=0, questions_per_image=5)
    for record in records:
        turns = record["conversations"]
        assert 4 <= len(turns) <= 10 and len(turns) % 2 == 0
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
