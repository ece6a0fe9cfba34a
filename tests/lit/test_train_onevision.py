"""LLaVA-OneVision through the real entry points, on a tiny OneVision saved with its images-only processor:
ATP trains a few steps in mask mode (atp_llava_shapes), the export loads with `atp.load_pruned` and prunes in
drop mode as in mask mode, evaluate.py scores the export and the base model with a training-free pruner
(accuracy recomputed from the saved answers), and the dataset's items are the processor's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close

import atp
from atp.data.llava_format import LlavaConversationDataset, prompt_loader, to_messages
from atp.data.processor import OnevisionImageProcessor, load_processor
from atp.data.shapes import write_dataset
from atp.evaluation import first_word
from atp.export import load_pruned
from atp.lit.evaluate_run import run_evaluation
from atp.models.adapter import MODEL_INPUT_KEYS
from tests.lit.test_train import ROOT, tiny_data, train_pruner_steps
from tests.next_inputs import save_onevision_testbed


@pytest.fixture(scope="module")
def onevision(tmp_path_factory) -> Path:
    return save_onevision_testbed(tmp_path_factory.mktemp("onevision") / "model")


def test_dataset_items_are_what_the_onevision_processor_makes(onevision, tmp_path):
    processor = load_processor(onevision)
    assert isinstance(processor, OnevisionImageProcessor) and processor.num_image_tokens == 16
    data = write_dataset(tmp_path / "data", {"test": (3, 3, 1)})
    dataset = LlavaConversationDataset(data / "test.json", data / "images", processor, prompt_only=True)
    for index in range(3):
        record = dataset.records[index]
        messages = to_messages(record["conversations"], has_image=True)[:1]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = Image.open(data / "images" / record["image"]).convert("RGB")
        reference = processor(images=[image], text=[text], return_tensors="pt")
        item = dataset[index]
        assert torch.equal(item["input_ids"], reference["input_ids"][0])
        for key in ("pixel_values", "image_sizes", "batch_num_images"):
            assert torch.equal(item["images"][key], reference[key]), key


def test_atp_trains_exports_loads_and_evaluates_on_onevision(onevision, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    metrics = train_pruner_steps("atp_llava_shapes", onevision, run, data)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    trained = {k.removeprefix("pruner."): v for k, v in final["state_dict"].items() if k.startswith("pruner.")}
    first = torch.load(next((run / "checkpoints").glob("*step=1.ckpt")), weights_only=False)["state_dict"]
    assert final["global_step"] == 3 and any(not torch.equal(first[f"pruner.{k}"], v) for k, v in trained.items())
    model, processor = load_pruned(run / "export")
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert isinstance(processor, OnevisionImageProcessor)
    loaded = atp.runtime_of(model).pruner
    exported = load_file(run / "export/pruner.safetensors")
    assert all(torch.equal(exported[k], v) and torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    # drop = mask on the processor's batches, thresholds moved into the score range (three steps keep all)
    loader = prompt_loader(data / "test.json", data / "images", processor, max_samples=4, batch_size=4)
    batch = {k: v for k, v in next(iter(loader)).items() if k in MODEL_INPUT_KEYS}
    placeholders = (batch["input_ids"] == processor.image_token_id).sum(1)
    with torch.no_grad():
        for module in loaded.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.5)
            module.spatial_head.bias.fill_(1.0)
            module.trunk[0].weight.normal_()
        drop_logits = model(**batch).logits[:, -1]
    stats = atp.stats(model)
    newlines = 8  # a 336 px square image: 2 x 2 crops of 4 x 4 tokens, one newline closing each of 8 rows
    assert stats.num_visual.tolist() == (placeholders - newlines).tolist() == [80] * 4
    assert int(stats.visual_tokens[:, -1].sum()) < 4 * 80  # it prunes
    atp.apply(model, loaded, mode="mask")
    with torch.no_grad():
        mask_logits = model(**batch).logits[:, -1]
    assert all(
        torch.equal(a, b) for layer in stats.kept for a, b in zip(stats.kept[layer], atp.stats(model).kept[layer])
    )
    assert_close(drop_logits, mask_logits, rtol=1e-4, atol=1e-5)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        exported_cfg = compose(
            config_name="evaluate",
            overrides=[f"export_path={run}/export", f"output_dir={tmp_path}/eval", "latency_batches=0"]
            + tiny_data(data)[:-3],
        )
        base_cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={onevision}",
                "pruner=fastv",
                "pruner.layer=1",
                f"output_dir={tmp_path}/eval2",
                "latency_batches=0",
            ]
            + tiny_data(data)[:-3],
        )
    result = run_evaluation(exported_cfg)
    assert result.num_samples == 4 and result.input_visual_tokens == 80
    fastv = run_evaluation(base_cfg)
    assert fastv.visual_tokens_per_layer[-1] == 40  # keep_ratio 0.5 of the 80 content tokens; newlines stay
    saved = json.loads((tmp_path / "eval2/results.json").read_text())
    recomputed = sum(first_word(s["prediction"]) == first_word(s["answer"]) for s in saved["per_sample"]) / 4
    assert saved["accuracy"] == recomputed
