"""The InternVL family through the real entry points, on a tiny InternVL3-layout testbed: train.py's base
training (shapes_base_internvl), ATP training (atp_internvl_shapes: mask mode, validated in drop mode), the
export, `atp.load_pruned`, evaluate.py and the FitPrune job, on the LLaVA-format data module with the family's
processor (a 336 px image: 2 x 2 tiles + thumbnail, 36 tokens each); and model=internvl3_8b stopping at once
without its weights."""

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
from atp.data.llava_format import prompt_loader
from atp.data.processor import InternVLImageProcessor, load_processor
from atp.evaluation import first_word
from atp.export import load_pruned
from atp.lit.evaluate_run import run_evaluation
from atp.lit.run import MissingAssetError, run_job
from atp.models.adapter import MODEL_INPUT_KEYS
from tests.lit.test_train import ROOT, compose_train, tiny_data, train_base, train_pruner_steps


@pytest.fixture(scope="module")
def internvl_base(tmp_path_factory) -> Path:
    """A tiny InternVL testbed model trained for 2 steps with experiment=shapes_base_internvl and exported."""
    return train_base("shapes_base_internvl", tmp_path_factory.mktemp("internvl_base"))


def image_tokens_of_a_test_image(processor, data: Path) -> int:
    """<IMG_CONTEXT> tokens the processor's own __call__ gives the first test image (the reference count)."""
    record = json.loads((data / "test.json").read_text())[0]
    image = Image.open(data / "images" / record["image"]).convert("RGB")
    ids = processor(images=[image], text=[processor.image_token], return_tensors="pt")["input_ids"]
    return int((ids == processor.image_token_id).sum())


def evaluate_cfg(overrides: list[str], data: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=[*overrides, *tiny_data(data)[:-3]])


def test_the_base_export_is_an_internvl_model_with_its_processor(internvl_base):
    config = json.loads((internvl_base / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["text_config"]["num_hidden_layers"] == 8
    saved = json.loads((internvl_base / "processor_config.json").read_text())
    assert saved["processor_class"] == "InternVLImageProcessor" and saved["image_seq_length"] == 36


def test_atp_trains_exports_loads_and_evaluates_on_internvl(internvl_base, tmp_path):
    data = tmp_path / "data"
    run = tmp_path / "run"
    metrics = train_pruner_steps("atp_internvl_shapes", internvl_base, run, data)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # the exported pruner is the trained one: the final checkpoint's pruner weights, on disk and loaded
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == 3
    trained = {k.removeprefix("pruner."): v for k, v in final["state_dict"].items() if k.startswith("pruner.")}
    model, processor = load_pruned(run / "export")
    assert type(model).__name__ == "InternVLForConditionalGeneration" and isinstance(processor, InternVLImageProcessor)
    loaded = atp.runtime_of(model).pruner
    exported = load_file(run / "export/pruner.safetensors")
    assert trained and exported.keys() == trained.keys() == loaded.state_dict().keys()
    for key, value in trained.items():
        assert torch.equal(exported[key], value) and torch.equal(loaded.state_dict()[key], value), key
    first = torch.load(next((run / "checkpoints").glob("*step=1.ckpt")), weights_only=False)["state_dict"]
    assert any(not torch.equal(first[f"pruner.{k}"], v) for k, v in trained.items())  # steps 2 and 3 moved it
    # on the processor's batches the loaded model prunes in drop mode as in mask mode (eval: hard decisions);
    # three steps leave the thresholds near their start (keep all), so they are moved into the score range here
    per_image = image_tokens_of_a_test_image(processor, data)
    assert per_image == 5 * 36  # 2 x 2 tiles + thumbnail
    loader = prompt_loader(data / "test.json", data / "images", processor, max_samples=4, batch_size=4)
    batch = {k: v for k, v in next(iter(loader)).items() if k in MODEL_INPUT_KEYS}
    assert batch["pixel_values"].shape == (4 * 5, 3, 168, 168)
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [per_image] * 4
    with torch.no_grad():
        for module in loaded.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.5)
            module.spatial_head.bias.fill_(1.0)
            module.trunk[0].weight.normal_()
        drop_logits = model(**batch).logits[:, -1]
    drop_kept = atp.stats(model).kept
    assert atp.stats(model).num_visual.tolist() == [per_image] * 4
    assert int(atp.stats(model).visual_tokens[:, -1].sum()) < 4 * per_image  # it prunes
    atp.apply(model, loaded, mode="mask")
    with torch.no_grad():
        mask_logits = model(**batch).logits[:, -1]
    assert all(torch.equal(a, b) for layer in drop_kept for a, b in zip(drop_kept[layer], atp.stats(model).kept[layer]))
    assert_close(drop_logits, mask_logits, rtol=1e-4, atol=1e-5)
    # evaluate.py on the export, and on the base model with a training-free pruner; the accuracy is the
    # share of saved predictions whose first word is the saved answer's
    exported_cfg = evaluate_cfg(
        [f"export_path={run}/export", f"output_dir={tmp_path}/eval", "latency_repeats=1", "latency_batches=1"], data
    )
    base_cfg = evaluate_cfg(
        [
            f"model_path={internvl_base}",
            "pruner=fastv",
            "pruner.layer=1",
            f"output_dir={tmp_path}/eval2",
            "latency_batches=0",
        ],
        data,
    )
    result = run_evaluation(exported_cfg)
    assert result.num_samples == 4 and result.input_visual_tokens == per_image
    assert result.avg_visual_tokens <= per_image
    fastv = run_evaluation(base_cfg)
    assert fastv.method.startswith("fastv (layer=1, keep_ratio=0.5") and fastv.avg_visual_tokens < per_image
    assert fastv.visual_tokens_per_layer[-1] == per_image // 2  # keep_ratio 0.5 of 180 after layer 1
    saved = json.loads((tmp_path / "eval2/results.json").read_text())
    answers = json.loads((data / "test.json").read_text())
    assert [s["answer"] for s in saved["per_sample"]] == [r["conversations"][1]["value"] for r in answers]
    recomputed = sum(first_word(s["prediction"]) == first_word(s["answer"]) for s in saved["per_sample"]) / 4
    assert saved["accuracy"] == recomputed


def test_evaluate_without_a_pruner_counts_every_tile_token(internvl_base, tmp_path):
    data = tmp_path / "data"
    cfg = evaluate_cfg([f"model_path={internvl_base}", f"output_dir={tmp_path}/eval", "max_samples=2"], data)
    result = run_evaluation(cfg)
    assert result.method == "unpruned" and result.num_samples == 2
    per_image = image_tokens_of_a_test_image(load_processor(internvl_base), data)
    assert result.input_visual_tokens == result.avg_visual_tokens == per_image == 180


def test_fitprune_job_on_internvl_writes_a_recipe_that_evaluate_runs(internvl_base, tmp_path):
    """train.py experiment=fitprune_shapes on the InternVL base -> recipe.json -> evaluate.py pruner=fitprune."""
    data = tmp_path / "data"
    content = run_job(
        compose_train(
            [
                "experiment=fitprune_shapes",
                f"model.path={internvl_base}",
                f"output_dir={tmp_path}/fit",
                "fit.calibration_samples=4",
                "fit.batch_size=4",
                "fit.flops_budget=0.8",
                "logger=none",
                *tiny_data(data),
            ]
        )
    )
    assert content["calibration_samples"] == 4 and content["flops_ratio"] <= 0.8 and content["recipe"]
    cfg = evaluate_cfg(
        [
            f"model_path={internvl_base}",
            "pruner=fitprune",
            f"pruner.recipe={tmp_path}/fit/recipe.json",
            f"output_dir={tmp_path}/eval",
            "latency_batches=0",
        ],
        data,
    )
    result = run_evaluation(cfg)
    deleted = sum(int(count) for count in content["recipe"].values())
    assert result.visual_tokens_per_layer[-1] == 180 - deleted  # every test image: 180 tokens, the recipe's deletions


def test_an_absolute_atp_target_on_internvl_is_refused(internvl_base):
    from atp.lit.module import VLMTrainingModule
    from atp.models.build import load_vlm
    from atp.token.atp import ATPPruner

    model, _ = load_vlm(str(internvl_base), with_processor=False)
    with pytest.raises(ValueError, match="give the target as a fraction"):
        VLMTrainingModule(model, ATPPruner(num_layers=8, hidden=8), train_parts="pruner", target_tokens=36)


@pytest.mark.parametrize("experiment", ["atp_internvl3", "fitprune_internvl3", "atp_llava_next"])
def test_internvl3_8b_without_weights_stops_naming_the_override(experiment, tmp_path):
    """The InternVL3-8B experiments, and another recipe with model=internvl3_8b, stop before loading anything."""
    cfg = compose_train([f"experiment={experiment}", "model=internvl3_8b", f"output_dir={tmp_path}", "logger=none"])
    assert cfg.model.weights == "OpenGVLab/InternVL3-8B-hf"
    with pytest.raises(MissingAssetError, match=r"model\.path=None \(a local OpenGVLab/InternVL3-8B-hf directory"):
        run_job(cfg)
