"""The lmms-eval plugin on the other families the runtime supports: a tiny Qwen2.5-VL testbed and a
tiny LLaVA-NeXT, each saved with its processor and loaded by the plugin from `pretrained=`
(skipped without the `lmms` extra).

Each runs the local POPE-style task through `simple_evaluate` with fastv at batch size 1 and 3,
on ragged prompts AND ragged images (three image sizes, so the samples of a batch have different
numbers of visual tokens). References, written here: answers of plain `generate` one prompt at a
time on prompts built as the plugin's docstring says (the model's chat template with one image part,
then the task's text; the processor expands the image tokens); the accounting recomputed from
`atp.stats` of those calls; the visual tokens at the LLM input recomputed from each family's
documented rule (Qwen: one token per 28 x 28 pixels; LLaVA-NeXT: the base view plus the unpadded
anyres grid, its row-closing newline tokens not counted).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lmms_eval", reason="needs the lmms extra (make setup-lmms)")

import atp  # noqa: E402
from atp.data.processor import CHAT_TEMPLATE, build_qwen_processor, build_tokenizer  # noqa: E402
from atp.data.shapes import vocabulary  # noqa: E402
from atp.integrations.lmms_tasks import pope_rows, write_pope_task  # noqa: E402
from atp.metrics import cost_report  # noqa: E402
from atp.models.build import build_testbed_qwen  # noqa: E402
from atp.models.tiny_next import tiny_llava_next  # noqa: E402
from tests.integrations.test_lmms_eval import FASTV, offline, simple_evaluate  # noqa: E402, F401

SAMPLES = 6
MAX_NEW_TOKENS = 3
SIZES = [(336, 336), (336, 168), (168, 336)]  # (width, height) of the POPE images, two samples each
NEXT_CROP, NEXT_PATCH = 16, 4
NEXT_PINPOINTS = [[NEXT_CROP, 2 * NEXT_CROP], [2 * NEXT_CROP, NEXT_CROP], [2 * NEXT_CROP, 2 * NEXT_CROP]]


def qwen_testbed():
    processor = build_qwen_processor(vocabulary())
    model = build_testbed_qwen(
        processor,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_heads=2,
        num_kv_heads=1,
        vision_hidden=32,
        vision_layers=1,
    )
    return model.eval(), processor


def next_testbed():
    """A tiny LLaVA-NeXT (CLIP tower of 4 x 4 patches per 16 px crop, 1x2 / 2x1 / 2x2 anyres layouts)
    and its processor on the ShapesVQA vocabulary."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = build_tokenizer(vocabulary())
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": NEXT_CROP},
            crop_size={"height": NEXT_CROP, "width": NEXT_CROP},
            image_grid_pinpoints=NEXT_PINPOINTS,
        ),
        tokenizer=tokenizer,
        patch_size=NEXT_PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    model = tiny_llava_next(
        "llava_next",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_heads=2,
        num_kv_heads=1,
        grid=NEXT_CROP // NEXT_PATCH,
        patch_size=NEXT_PATCH,
    )
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, processor


def qwen_visual_tokens(width: int, height: int) -> tuple[int, int]:
    """(content tokens, image placeholders) of a Qwen-VL image whose sides are multiples of 28 px
    within the processor's pixel bounds: one token per 2 x 2 merged 14 px patches."""
    tokens = (width // 28) * (height // 28)
    return tokens, tokens


def next_visual_tokens(width: int, height: int) -> tuple[int, int]:
    """(content tokens, image placeholders) of a LLaVA-NeXT image: the base view's patches, plus the
    anyres grid (the best pinpoint's crops in patches) unpadded back to the image's aspect ratio, each
    of its rows closed by one newline placeholder (not a content token)."""
    from transformers.image_processing_utils import select_best_resolution

    grid = NEXT_CROP // NEXT_PATCH
    best_height, best_width = select_best_resolution((height, width), NEXT_PINPOINTS)
    rows, cols = best_height // NEXT_CROP * grid, best_width // NEXT_CROP * grid
    if width / height > cols / rows:  # wider than the grid: padding rows top and bottom
        rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
    content = grid * grid + rows * cols
    return content, content + rows


FAMILIES = {"qwen2_5_vl": (qwen_testbed, qwen_visual_tokens), "llava_next": (next_testbed, next_visual_tokens)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    build, visual_tokens = FAMILIES[request.param]
    model, processor = build()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    rows = pope_rows(SAMPLES, seed=3)
    for index, row in enumerate(rows):  # ragged prompts (0, 2 or 4 more words) and ragged images
        row["question"] = "now the " * (index % 3) + row["question"]
        row["image"] = row["image"].resize(SIZES[index // 2])
    write_pope_task(root / "tasks", rows, max_new_tokens=MAX_NEW_TOKENS)
    return {
        "name": request.param,
        "model": root / "model",
        "tasks": root / "tasks",
        "rows": rows,
        "build": build,
        "visual_tokens": visual_tokens,
    }


def reference(model, processor, rows):
    """Per question, one prompt at a time: (generated answer, the prefill's atp.stats, input_ids)."""
    results = []
    for row in rows:
        content = [{"type": "image"}, {"type": "text", "text": row["question"].strip()}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        inputs = processor(text=[text], images=[row["image"].convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        results.append((answer, atp.stats(model), inputs["input_ids"][0]))
    return results


def test_fastv_at_batch_1_and_3_equals_one_prompt_generate_and_stats(family, tmp_path):
    args = f"pretrained={family['model']},{FASTV},latency_batches=0"
    _, one, _ = simple_evaluate(family, args, "pope_shapes", 1, tmp_path / "b1")
    _, three, accounting = simple_evaluate(family, args, "pope_shapes", 3, tmp_path / "b3")
    assert one == three  # per sample: batch 3 (ragged prompts and images, left-padded) = batch 1

    model, processor = family["build"]()
    atp.apply(model.eval(), atp.build_pruner("fastv", layer=1, keep_ratio=0.25))
    expected = reference(model, processor, family["rows"])
    assert [three[i] for i in range(SAMPLES)] == [answer for answer, _, _ in expected]

    image_id = model.config.image_token_id
    counts = [family["visual_tokens"](*row["image"].size) for row in family["rows"]]
    assert len({content for content, _ in counts}) > 1, "the images should give ragged visual tokens"
    for (_, stats, ids), (content, placeholders) in zip(expected, counts):
        assert int((ids == image_id).sum()) == placeholders
        assert int(stats.visual_tokens[0, 0]) == content  # newline placeholders are not visual tokens

    task = accounting["tasks"]["pope_shapes"]
    reports = [cost_report(model.config.get_text_config(), stats) for _, stats, _ in expected]
    assert task["num_samples"] == SAMPLES
    assert task["input_visual_tokens"] == pytest.approx(sum(c for c, _ in counts) / SAMPLES)
    assert task["avg_visual_tokens"] == pytest.approx(
        sum(float(s.average_visual_tokens()[0]) for _, s, _ in expected) / SAMPLES
    )
    layers = torch.stack([s.visual_tokens[0].double() for _, s, _ in expected]).mean(0)
    assert task["visual_tokens_per_layer"] == pytest.approx(layers.tolist())
    flops = sum(float(r.flops.sum()) for r in reports) / sum(float(r.flops_unpruned.sum()) for r in reports)
    kv = sum(float(r.kv_bytes.sum()) for r in reports) / sum(float(r.kv_bytes_unpruned.sum()) for r in reports)
    assert task["flops_ratio"] == pytest.approx(flops) and task["flops_ratio"] < 1
    assert task["kv_ratio"] == pytest.approx(kv)
    samples = [json.loads(line) for line in next((tmp_path / "b3").glob("atp_samples_pope_shapes_*.jsonl")).open()]
    by_doc = {s["doc_id"]: s["input_visual_tokens"] for s in samples}
    assert by_doc == {i: content for i, (content, _) in enumerate(counts)}


def test_the_stock_model_counts_the_visual_tokens_of_the_family_rule(family, tmp_path):
    """No pruner: every layer sees the prompt's visual tokens, as the family's rule counts them
    (LLaVA-NeXT's newline placeholders excluded, as the runtime excludes them when it prunes)."""
    _, _, accounting = simple_evaluate(
        family, f"pretrained={family['model']},latency_batches=0", "pope_shapes", 3, tmp_path
    )
    task = accounting["tasks"]["pope_shapes"]
    contents = [family["visual_tokens"](*row["image"].size)[0] for row in family["rows"]]
    assert accounting["atp"]["pruner"] is None
    assert task["input_visual_tokens"] == pytest.approx(sum(contents) / SAMPLES)
    assert task["avg_visual_tokens"] == pytest.approx(sum(contents) / SAMPLES)
    assert task["visual_tokens_per_layer"] == pytest.approx([sum(contents) / SAMPLES] * 4)
    assert task["flops_ratio"] == 1.0 and task["kv_ratio"] == 1.0 and task["latency_ratio"] == 1.0
    samples = [json.loads(line) for line in next(tmp_path.glob("atp_samples_pope_shapes_*.jsonl")).open()]
    assert {s["doc_id"]: s["input_visual_tokens"] for s in samples} == dict(enumerate(contents))


def test_budget_tokens_needs_one_visual_token_count_per_image():
    """budget_tokens=B is B of an image's visual tokens: on LLaVA-1.5 its tower's grid (FastV keeps
    B / grid tokens); refused on the families whose images have their own counts, LLaVA-NeXT included
    (whose config still carries an `image_seq_length`, 576, that is no image's count)."""
    from atp.integrations.lmms_eval import build_spec_pruner
    from atp.integrations.lmms_spec import parse_model_args
    from atp.models.tiny import tiny_llava

    spec = parse_model_args({"pretrained": "/m", "pruner": "fastv", "budget_tokens": 8})
    llava = tiny_llava()
    side = llava.config.vision_config.image_size // llava.config.vision_config.patch_size
    assert build_spec_pruner(spec, llava).budget.keep_ratio == pytest.approx(8 / side**2)
    for build, _ in FAMILIES.values():
        model, _ = build()
        with pytest.raises(ValueError, match="budget_tokens needs a fixed number of visual tokens per image"):
            build_spec_pruner(spec, model)


def test_loglikelihood_at_batch_3_equals_the_stock_forward(family):
    """The `none` pruner (the full runtime, nothing pruned) at batch size 3 with ragged prompts and
    images: each one-word continuation's log-probability and greedy flag equal the stock HF forward's
    on that prompt alone (chat template, one image part, the question; then the answer word)."""
    from lmms_eval.api.instance import Instance

    from atp.integrations.lmms_eval import AtpLmms

    lm = AtpLmms(pretrained=str(family["model"]), pruner="none", batch_size=3, device="cpu", latency_batches=0)
    rows = [family["rows"][i] for i in (0, 3, 5)]  # three image sizes, three prompt lengths
    lm.task_dict = {"t": {"test": dict(enumerate(rows))}}
    answers = ("yes", "no")
    requests = [
        Instance(
            "loglikelihood",
            (row["question"], " " + answer, lambda doc: [doc["image"]], i, "t", "test"),
            0,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for answer in answers
        for i, row in enumerate(rows)
    ]
    results = lm.loglikelihood(requests)
    model, processor = family["build"]()
    for j, answer in enumerate(answers):
        for i, row in enumerate(rows):
            content = [{"type": "image"}, {"type": "text", "text": row["question"].strip()}]
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            inputs = processor(text=[prompt + " " + answer], images=[row["image"].convert("RGB")], return_tensors="pt")
            assert int(inputs["input_ids"][0, -1]) == processor.tokenizer.convert_tokens_to_ids(answer)
            with torch.no_grad():
                log_probs = model(**inputs).logits[0, -2].log_softmax(-1)
            total, greedy = results[j * len(rows) + i]
            assert total == pytest.approx(float(log_probs[inputs["input_ids"][0, -1]]), abs=1e-4)
            assert greedy == (int(log_probs.argmax()) == int(inputs["input_ids"][0, -1]))
