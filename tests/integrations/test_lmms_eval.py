"""The lmms-eval plugin end to end, offline, on a tiny testbed LLaVA (skipped without the `lmms` extra).

References: answers from plain `generate` calls one prompt at a time on prompts built the way
`evaluate.py` builds them (`LlavaConversationDataset`: the chat template, the image token
repeated by hand, the tokenizer); POPE's metrics recomputed from the logged answers with POPE's
rule written out here; the accounting recomputed from `atp.stats` of one forward per prompt; the
ShapesVQA accuracy of `atp.evaluation.evaluate` (what evaluate.py runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="needs the lmms extra (make setup-lmms)")

import atp  # noqa: E402
from atp.data.llava_format import prompt_loader  # noqa: E402
from atp.data.processor import build_processor  # noqa: E402
from atp.data.shapes import vocabulary, write_dataset  # noqa: E402
from atp.evaluation import evaluate, first_word  # noqa: E402
from atp.export import save_model, save_pruned  # noqa: E402
from atp.integrations.lmms_tasks import pope_rows, write_pope_task, write_shapes_task  # noqa: E402
from atp.metrics import cost_report  # noqa: E402
from atp.models.build import build_testbed_llava  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
FASTV = "pruner=fastv,pruner.layer=1,pruner.keep_ratio=0.25"
SAMPLES = 6


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def tiny_testbed(processor, hidden: int = 32, seed: int = 0):
    """A tiny testbed LLaVA whose first answer word is "yes" or "no" depending on the image.

    A random LLM answers with whatever word, the same for every image. Here the LM head's rows for
    "yes" and "no" become +/- the direction along which the fastv-pruned model's last prompt
    state varies most over 32 other seeded POPE questions (made orthogonal to their mean), scaled
    to dominate: POPE's metrics then see both answers."""
    model = build_testbed_llava(
        processor,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=4,
        num_heads=2,
        num_kv_heads=1,
        vision_hidden=32,
        vision_layers=1,
        calibration_images=4,
        seed=seed,
    ).eval()
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
    with torch.no_grad():
        states = torch.stack(
            [
                model(
                    **evaluate_py_inputs(processor, row["question"], row["image"]), output_hidden_states=True
                ).hidden_states[-1][0, -1]
                for row in pope_rows(32, seed=11)
            ]
        )  # [32, d]
        mean, spread = states.mean(0), states - states.mean(0)
        direction = torch.linalg.svd(spread, full_matrices=False).Vh[0]
        direction -= (direction @ mean) / (mean @ mean) * mean
        direction *= 1000 / (spread @ direction).abs().max()
        yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
        model.lm_head.weight[yes], model.lm_head.weight[no] = direction, -direction
    atp.remove(model)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    processor = build_processor(vocabulary())
    model = tiny_testbed(processor)
    save_model(root / "model", model, processor)
    save_model(root / "other", tiny_testbed(processor, hidden=64, seed=1), processor)
    export = save_pruned(root / "export", model, processor, atp.build_pruner("atp", num_layers=4, layers=[1, 2]))
    rows = pope_rows(SAMPLES, seed=3)
    for index, row in enumerate(rows):  # ragged prompts: 0, 2 or 4 more words
        row["question"] = "now the " * (index % 3) + row["question"]
    write_pope_task(root / "tasks", rows, max_new_tokens=1)
    data = write_dataset(root / "shapes", {"test": (8, 7, 1)})
    write_shapes_task(root / "tasks", data / "test.json", data / "images")
    return {
        "root": root,
        "model": root / "model",
        "other": root / "other",
        "export": export,
        "rows": rows,
        "tasks": root / "tasks",
        "shapes": data,
        "processor": processor,
    }


def simple_evaluate(assets, model_args: str, task: str, batch_size: int, out: Path):
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(assets["tasks"]))
    results = evaluator.simple_evaluate(
        model="atp",
        model_args=f"{model_args},output_dir={out}",
        tasks=[task],
        batch_size=batch_size,
        device="cpu",
        task_manager=manager,
        log_samples=True,
    )
    answers = {s["doc_id"]: s["resps"][0][0] for s in results["samples"][task]}
    accounting = json.loads(next(out.glob("atp_accounting_*.json")).read_text())
    return results, answers, accounting


def evaluate_py_inputs(processor, question: str, image) -> dict:
    """One prompt as evaluate.py's dataset builds it (atp.data.llava_format): template, then the
    image token repeated by hand, then the tokenizer without special tokens."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    tokens = (pixel_values.shape[-1] // processor.patch_size) ** 2
    ids = processor.tokenizer(text.replace("<image>", "<image>" * tokens), add_special_tokens=False)["input_ids"]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixel_values,
    }


def reference(model, processor, rows, max_new_tokens: int = 1):
    """Per question: the generated answer and the prefill's atp.stats, one prompt at a time."""
    answers, stats = [], []
    for row in rows:
        inputs = evaluate_py_inputs(processor, row["question"], row["image"])
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
            )
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        stats.append(atp.stats(model) if getattr(model, "_atp_runtime", None) is not None else None)
    return answers, stats


def pope_metrics(answers: list[str], truths: list[str]) -> dict:
    """POPE's rule: a prediction is its text lower-cased and stripped; yes is the positive class."""
    preds = [a.lower().strip() for a in answers]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, truths))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, truths))
    fn = sum(p == "no" and t == "yes" for p, t in zip(preds, truths))
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    return {
        "pope_accuracy": sum(p == t for p, t in zip(preds, truths)) / len(preds),
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0,
    }


def test_fastv_at_batch_1_and_3_pope_scored_and_accounted(assets, tmp_path):
    args = f"pretrained={assets['model']},{FASTV},latency_repeats=1"
    _, one, _ = simple_evaluate(assets, args, "pope_shapes", 1, tmp_path / "b1")
    results, three, accounting = simple_evaluate(assets, args, "pope_shapes", 3, tmp_path / "b3")
    assert one == three  # per sample, batch 3 (ragged prompts, left-padded) = batch 1

    model = tiny_testbed(assets["processor"])
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
    answers, stats = reference(model, assets["processor"], assets["rows"])
    assert [three[i] for i in range(SAMPLES)] == answers
    assert {"yes", "no"} <= {a.strip() for a in answers}, "the test model should answer both ways"
    expected = pope_metrics(answers, [r["answer"] for r in assets["rows"]])
    for name, value in expected.items():
        assert results["results"]["pope_shapes"][f"{name},none"] == pytest.approx(value)

    task = accounting["tasks"]["pope_shapes"]
    config = model.config.text_config
    reports = [cost_report(config, s) for s in stats]
    assert task["num_samples"] == SAMPLES
    assert task["avg_visual_tokens"] == pytest.approx(sum(float(s.average_visual_tokens()[0]) for s in stats) / SAMPLES)
    assert task["input_visual_tokens"] == pytest.approx(sum(int(s.visual_tokens[0, 0]) for s in stats) / SAMPLES)
    flops = sum(float(r.flops.sum()) for r in reports) / sum(float(r.flops_unpruned.sum()) for r in reports)
    kv = sum(float(r.kv_bytes.sum()) for r in reports) / sum(float(r.kv_bytes_unpruned.sum()) for r in reports)
    assert task["flops_ratio"] == pytest.approx(flops) and task["flops_ratio"] < 1
    assert task["kv_ratio"] == pytest.approx(kv)
    assert task["latency_ratio"] > 0 and task["latency_rounds"] == 1
    assert accounting["atp"]["pruner"] == "fastv" and accounting["atp"]["batch_size"] == 3
    per_sample = [json.loads(line) for line in next((tmp_path / "b3").glob("atp_samples_pope_shapes_*.jsonl")).open()]
    assert sorted(s["doc_id"] for s in per_sample) == list(range(SAMPLES))


def test_an_atp_export_alone_and_on_its_pretrained_base(assets, tmp_path):
    _, alone, accounting = simple_evaluate(
        assets, f"export={assets['export']},latency_batches=0", "pope_shapes", 3, tmp_path / "a"
    )
    _, based, _ = simple_evaluate(
        assets,
        f"pretrained={assets['model']},export={assets['export']},latency_batches=0",
        "pope_shapes",
        2,
        tmp_path / "b",
    )
    model, processor = atp.load_pruned(assets["export"])
    answers, stats = reference(model, processor, assets["rows"])
    assert [alone[i] for i in range(SAMPLES)] == answers == [based[i] for i in range(SAMPLES)]
    task = accounting["tasks"]["pope_shapes"]
    assert accounting["atp"]["export"] == str(assets["export"])
    assert task["avg_visual_tokens"] == pytest.approx(sum(float(s.average_visual_tokens()[0]) for s in stats) / SAMPLES)
    assert task["latency_ratio"] is None  # latency_batches=0: not measured, and not claimed


def test_shapesvqa_through_lmms_eval_scores_as_evaluate_py(assets, tmp_path):
    args = f"pretrained={assets['model']},{FASTV},latency_batches=0"
    results, answers, _ = simple_evaluate(assets, args, "shapesvqa", 3, tmp_path / "s")
    model = tiny_testbed(assets["processor"])
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
    shapes = assets["shapes"]
    loader = prompt_loader(shapes / "test.json", shapes / "images", assets["processor"], batch_size=4)
    reference_result = evaluate(model, assets["processor"], loader, "fastv", max_new_tokens=3, latency_batches=0)
    predictions = [s["prediction"] for s in reference_result.per_sample]
    assert [first_word(answers[i]) for i in range(len(predictions))] == predictions
    assert results["results"]["shapesvqa"]["exact_match,none"] == pytest.approx(reference_result.accuracy)


def test_an_export_for_another_base_is_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="made for another base model.*text_hidden_size"):
        simple_evaluate(assets, f"pretrained={assets['other']},export={assets['export']}", "pope_shapes", 1, tmp_path)


def lmms_cli(assets, model_args: str, out: Path, batch_size: int = 3) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "atp",
        "--model_args",
        model_args,
        "--tasks",
        "pope_shapes",
        "--include_path",
        str(assets["tasks"]),
        "--batch_size",
        str(batch_size),
        "--device",
        "cpu",
        "--output_path",
        str(out),
        "--log_samples",
        "--verbosity",
        "DEBUG",
    ]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def unsupported_model(assets):
    """A tiny PaliGemma: an image-text-to-text family that atp's runtime has no adapter for."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    text = GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    path = assets["root"] / "paligemma"
    PaliGemmaForConditionalGeneration(
        PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=63)
    ).save_pretrained(path)
    return path


def test_the_cli_runs_the_plugin_and_fails_loudly_on_bad_input(assets, tmp_path, unsupported_model):
    runs = {
        "ok": lmms_cli(assets, f"pretrained={assets['model']},{FASTV},latency_repeats=1", tmp_path / "ok"),
        "unknown pruner": lmms_cli(assets, f"pretrained={assets['model']},pruner=nosuch", tmp_path / "x1"),
        "missing model": lmms_cli(assets, f"pretrained={tmp_path / 'absent'},{FASTV}", tmp_path / "x2"),
        "another base": lmms_cli(assets, f"pretrained={assets['other']},export={assets['export']}", tmp_path / "x3"),
        "unsupported family": lmms_cli(assets, f"pretrained={unsupported_model},{FASTV}", tmp_path / "x4"),
    }
    logs = {name: process.communicate(timeout=600)[0] for name, process in runs.items()}
    codes = {name: process.returncode for name, process in runs.items()}
    assert codes["ok"] == 0, logs["ok"][-3000:]
    expected = {
        "unknown pruner": "unknown pruner 'nosuch'; available pruners:",
        "missing model": "config.json missing",
        "another base": "made for another base model",
        "unsupported family": "atp token pruning does not support PaliGemmaForConditionalGeneration",
    }
    for name, message in expected.items():
        assert codes[name] != 0 and message in logs[name], (name, codes[name], logs[name][-2000:])
    folder = next((tmp_path / "ok").iterdir())  # lmms-eval's <output_path>/<model name>/
    results = json.loads(next(folder.glob("*_results.json")).read_text())
    accounting = json.loads(next(folder.glob("atp_accounting_*.json")).read_text())  # beside lmms-eval's results
    assert set(accounting["tasks"]) == set(results["results"]) == {"pope_shapes"}
    logged = {
        s["doc_id"]: s["filtered_resps"]
        for s in map(json.loads, next(folder.glob("*_samples_pope_shapes.jsonl")).open())
    }
    model = tiny_testbed(assets["processor"])
    atp.apply(model, atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
    answers, _ = reference(model, assets["processor"], assets["rows"])
    assert [logged[i] for i in range(SAMPLES)] == answers


def test_loglikelihood_of_the_continuation_equals_the_stock_forward(assets):
    """The `none` pruner (the full runtime, nothing pruned) at batch size 2 with ragged prompts: the
    continuation's log-probability equals the stock HF forward's on the prompt alone, one at a time."""
    from lmms_eval.api.instance import Instance

    from atp.integrations.lmms_eval import AtpLmms

    lm = AtpLmms(pretrained=str(assets["model"]), pruner="none", batch_size="2", device="cpu", latency_batches=0)
    rows = assets["rows"][:3]
    lm.task_dict = {"t": {"test": {i: row for i, row in enumerate(rows)}}}
    requests = [
        Instance(
            "loglikelihood",
            (row["question"], " " + answer, lambda doc: [doc["image"]], i, "t", "test"),
            0,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, row in enumerate(rows)
        for answer in ("yes", "no")
    ]
    results = lm.loglikelihood(requests)
    model = tiny_testbed(assets["processor"])
    yes, no = assets["processor"].tokenizer.convert_tokens_to_ids(["yes", "no"])
    for i, row in enumerate(rows):
        inputs = evaluate_py_inputs(assets["processor"], row["question"], row["image"])
        with torch.no_grad():
            log_probs = model(**inputs).logits[0, -1].log_softmax(-1)
        for j, token in enumerate((yes, no)):
            total, greedy = results[2 * i + j]
            assert total == pytest.approx(float(log_probs[token]), abs=1e-4)
            assert greedy == (int(log_probs.argmax()) == token)
    assert lm.finish_accounting()["tasks"]["t"]["num_samples"] == 6
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round(requests)
