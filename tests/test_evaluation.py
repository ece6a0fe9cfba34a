"""The evaluation protocol and budget matching, against independent computations."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader

import atp
from atp.budget import single_cut_keep_ratio
from atp.data.llava_format import LlavaConversationDataset, collate
from atp.data.processor import build_processor
from atp.data.shapes import vocabulary, write_dataset
from atp.evaluation import evaluate, first_word, markdown_table, spearman
from atp.metrics import cost_report
from tests.conftest import tiny_testbed_model


def brute_force_spearman(x, y):
    def ranks(v):
        return [sum(u < w for u in v) + (sum(u == w for u in v) - 1) / 2 for w in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def test_spearman_with_ties_matches_brute_force():
    x, y = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]
    assert spearman(x, y) == pytest.approx(brute_force_spearman(x, y))
    assert spearman([1, 2, 3], [5, 5, 5]) is None


def test_first_word():
    assert first_word("  Red. square") == "red" and first_word("") == ""


def test_single_cut_keep_ratio_reaches_the_average():
    ratio = single_cut_keep_ratio(average_tokens=100.0, num_visual=576, num_layers=8, layer=1)
    assert (1 * 576 + 7 * ratio * 576) / 8 == pytest.approx(100.0)
    with pytest.raises(ValueError, match="cannot be reached by one cut before layer 2"):
        single_cut_keep_ratio(average_tokens=100.0, num_visual=576, num_layers=8, layer=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("shapes"), {"test": (6, 3, 1)})
    processor = build_processor(vocabulary())
    model = tiny_testbed_model(processor)
    dataset = LlavaConversationDataset(root / "test.json", root / "images", processor, prompt_only=True)
    loader = DataLoader(dataset, batch_size=3, collate_fn=functools.partial(collate, pad_token_id=0))
    return model, processor, loader


def test_evaluate_reports_consistent_numbers(setup):
    model, processor, loader = setup
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25).eval(), mode="drop")
    result = evaluate(model, processor, loader, "fastv", latency_batches=1, latency_repeats=1)
    assert result.num_samples == 6 and len(result.per_sample) == 6
    assert result.accuracy == sum(s["correct"] for s in result.per_sample) / 6
    assert result.input_visual_tokens == 576
    assert result.avg_visual_tokens == pytest.approx((576 + 3 * 144) / 4)
    runtime = atp.runtime_of(model)  # the latency measurement detached and re-attached the pruner
    assert runtime.pruner.name == "fastv" and runtime.mode == "drop"
    costs = torch.zeros(4, dtype=torch.float64)  # FLOPs and KV bytes: the accounting module, every prompt
    for batch in loader:
        with torch.no_grad():
            model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        report = cost_report(model.config.text_config, atp.stats(model))
        parts = (report.flops, report.flops_unpruned, report.kv_bytes, report.kv_bytes_unpruned)
        costs += torch.tensor([float(part.sum()) for part in parts], dtype=torch.float64)
    assert 0.3 < result.flops_ratio < 1 and result.flops_ratio == pytest.approx(float(costs[0] / costs[1]), rel=1e-6)
    assert result.kv_ratio == pytest.approx(float(costs[2] / costs[3]), rel=1e-6)
    assert result.flops_ratio != pytest.approx(report.flops_ratio, rel=1e-6)  # the sum is not the last batch's
    assert math.isfinite(result.latency_ratio) and result.latency_ratio > 0
    assert "| fastv |" in markdown_table([result])
    atp.remove(model)


# (generated text, reference answer, question type, correct by the first-word rule)
ANSWER_CASES = [
    ("red square", "Red", "color", True),  # only the first word counts; case does not
    ("yes", "Yes.", "exist", True),  # punctuation in the answer
    ("square", "square, probably", "shape", True),  # a comma after the first word
    ("blue red", "red", "color", False),  # the answer's word appears, but not first
    ("no", "None.", "exist", False),  # a prefix of the answer's first word
    ("three", "two", "count", False),
]


def test_correct_is_the_first_word_match_on_hand_written_answers(setup, monkeypatch):
    model, processor, loader = setup
    tokenizer = processor.tokenizer
    batches = []
    for batch, start in zip(loader, range(0, len(ANSWER_CASES), 3)):
        cases = ANSWER_CASES[start : start + 3]
        batches.append({**batch, "answer": [c[1] for c in cases], "question_type": [c[2] for c in cases]})
    assert sum(len(b["answer"]) for b in batches) == len(ANSWER_CASES)
    texts = iter([[c[0] for c in ANSWER_CASES[i : i + 3]] for i in range(0, len(ANSWER_CASES), 3)])

    def generate(input_ids, **kwargs):  # greedy decoding replaced by the hand-written texts
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in next(texts)]
        width = max(map(len, encoded))
        new = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in encoded])
        return torch.cat([input_ids, new], 1)

    monkeypatch.setattr(model, "generate", generate)  # this instance only
    result = evaluate(model, processor, batches, "scripted")
    assert [s["prediction"] for s in result.per_sample] == ["red", "yes", "square", "blue", "no", "three"]
    assert [s["correct"] for s in result.per_sample] == [c[3] for c in ANSWER_CASES]
    assert result.accuracy == 3 / 6
    assert result.accuracy_by_type == {"color": 1 / 2, "count": 0.0, "exist": 1 / 2, "shape": 1.0}


def test_blind_controls_change_the_images_only(setup):
    model, processor, loader = setup
    seen = []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("pixel_values", a[0] if a else None)), with_kwargs=True
    )
    evaluate(model, processor, loader, "unpruned")
    evaluate(model, processor, loader, "blind", blind="noise")
    evaluate(model, processor, loader, "blank", blind="blank")
    handle.remove()
    real, noise, blank = seen[0], seen[len(seen) // 3], seen[2 * len(seen) // 3]
    assert real.shape == noise.shape == blank.shape and not torch.allclose(real, noise)
    black = processor.image_processor(Image.new("RGB", (real.shape[-1], real.shape[-2])), return_tensors="pt")
    assert_close(blank, black["pixel_values"].expand_as(blank))  # the processor's own black image
    assert not torch.allclose(blank, real)
    with pytest.raises(ValueError, match="blind must be None or one of"):
        evaluate(model, processor, loader, "bad", blind="zeros")


def test_evaluate_reports_the_vision_towers_flops_apart(setup):
    """An in-tower pruner: the tower's FLOPs ratio from the accounting module over every prompt,
    shown beside the LLM's, which stays the LLM's alone."""
    from atp.models.build import build_testbed_llava

    _, processor, loader = setup
    model = build_testbed_llava(
        processor, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
        vision_hidden=32, vision_layers=4, calibration_images=8,
    ).eval()  # fmt: skip
    atp.apply(model, atp.build_pruner("flowcut", keep_tokens=64), mode="drop")
    result = evaluate(model, processor, loader, "flowcut", latency_batches=0)
    tower = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        with torch.no_grad():
            model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        report = cost_report(model.config, atp.stats(model))
        parts = (report.vision_flops, report.vision_flops_unpruned, report.flops, report.flops_unpruned)
        tower += torch.tensor([float(part.sum()) for part in parts], dtype=torch.float64)
        assert atp.stats(model).kept[0][0].numel() == 64
    assert 0 < result.vision_flops_ratio < 1
    assert result.vision_flops_ratio == pytest.approx(float(tower[0] / tower[1]), rel=1e-6)
    assert result.flops_ratio == pytest.approx(float(tower[2] / tower[3]), rel=1e-6)
    assert f"(tower {100 * result.vision_flops_ratio:.1f} %)" in markdown_table([result])
    atp.remove(model)
