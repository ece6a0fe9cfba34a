"""The Qwen-VL family through the real entry points, on a tiny Qwen2.5-VL testbed: train.py's base
training (shapes_base_qwen), ATP training (atp_qwen_shapes: mask mode, validated in drop mode), the
export, `atp.load_pruned` and evaluate.py, on the LLaVA-format data module with the family's processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch.testing import assert_close

import atp
from atp.data.llava_format import prompt_loader
from atp.data.processor import QwenImageProcessor
from atp.export import load_pruned
from atp.lit.evaluate_run import run_evaluation
from atp.lit.run import run_training
from atp.models.adapter import MODEL_INPUT_KEYS
from atp.models.build import load_vlm
from tests.lit.test_train import ROOT, compose_train, tiny_data, train_base


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL testbed model trained for 2 steps with experiment=shapes_base_qwen and exported."""
    return train_base("shapes_base_qwen", tmp_path_factory.mktemp("qwen_base"))


def test_the_base_export_is_a_qwen_model_with_its_processor(qwen_base):
    config = json.loads((qwen_base / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["text_config"]["num_hidden_layers"] == 8
    assert json.loads((qwen_base / "processor_config.json").read_text())["processor_class"] == "QwenImageProcessor"


def test_atp_trains_exports_loads_and_evaluates_on_qwen(qwen_base, tmp_path):
    data = tmp_path / "data"
    run = tmp_path / "run"
    run_training(
        compose_train(
            [
                "experiment=atp_qwen_shapes",
                f"model.path={qwen_base}",
                f"output_dir={run}",
                f"export_dir={run}/export",
                "trainer.max_steps=2",
                "trainer.val_check_interval=null",
                "trainer.check_val_every_n_epoch=100",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "callbacks.checkpoint.every_n_train_steps=1",
                "pruner.hidden=16",
                *tiny_data(data),
            ]
        )
    )
    # the exported pruner is the trained one: the final checkpoint's pruner weights, on disk and loaded
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == 2
    trained = {k.removeprefix("pruner."): v for k, v in final["state_dict"].items() if k.startswith("pruner.")}
    model, processor = load_pruned(run / "export")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and isinstance(processor, QwenImageProcessor)
    loaded = atp.runtime_of(model).pruner
    exported = load_file(run / "export/pruner.safetensors")
    assert trained and exported.keys() == trained.keys() == loaded.state_dict().keys()
    for key, value in trained.items():
        assert torch.equal(exported[key], value) and torch.equal(loaded.state_dict()[key], value), key
    # on the processor's batches, the loaded model prunes in drop mode as in mask mode (eval: hard decisions);
    # two steps leave the thresholds near their start (keep all), so they are moved into the score range here
    loader = prompt_loader(data / "test.json", data / "images", processor, max_samples=4, batch_size=4)
    batch = {k: v for k, v in next(iter(loader)).items() if k in MODEL_INPUT_KEYS}
    assert batch["image_grid_thw"].tolist() == [[1, 24, 24]] * 4 and "mm_token_type_ids" in batch
    with torch.no_grad():
        for module in loaded.modules_by_layer.values():
            module.redundancy_head.bias.fill_(0.5)
            module.spatial_head.bias.fill_(1.0)
            module.trunk[0].weight.normal_()
        drop_logits = model(**batch).logits[:, -1]
    drop_kept = atp.stats(model).kept
    assert int(atp.stats(model).visual_tokens[:, -1].sum()) < 4 * 144  # it prunes
    atp.apply(model, loaded, mode="mask")
    with torch.no_grad():
        mask_logits = model(**batch).logits[:, -1]
    assert all(torch.equal(a, b) for layer in drop_kept for a, b in zip(drop_kept[layer], atp.stats(model).kept[layer]))
    assert_close(drop_logits, mask_logits, rtol=1e-4, atol=1e-5)
    # evaluate.py on the export, and on the base model with a training-free pruner
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        exported_cfg = compose(
            config_name="evaluate",
            overrides=[
                f"export_path={run}/export",
                f"output_dir={tmp_path}/eval",
                "latency_repeats=1",
                "latency_batches=1",
                *tiny_data(data)[:-3],
            ],
        )
        base_cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={qwen_base}",
                "pruner=fastv",
                "pruner.layer=1",
                f"output_dir={tmp_path}/eval2",
                "latency_batches=0",
                *tiny_data(data)[:-3],
            ],
        )
    result = run_evaluation(exported_cfg)
    assert result.num_samples == 4 and result.input_visual_tokens == 144 and result.avg_visual_tokens <= 144
    fastv = run_evaluation(base_cfg)
    assert fastv.method.startswith("fastv (layer=1, keep_ratio=0.5") and fastv.avg_visual_tokens < 144


def test_budget_tokens_on_a_dynamic_resolution_model_is_refused(qwen_base, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={qwen_base}",
                "pruner=fastv",
                "budget_tokens=64",
                f"output_dir={tmp_path}/eval",
                *tiny_data(tmp_path / "data")[:-3],
            ],
        )
    with pytest.raises(ValueError, match=r"budget_tokens=64 .* pruner.keep_ratio=0.25"):
        run_evaluation(cfg)


def test_an_absolute_atp_target_on_qwen_is_refused(qwen_base):
    from atp.lit.module import VLMTrainingModule
    from atp.token.atp import ATPPruner

    model, _ = load_vlm(str(qwen_base), with_processor=False)
    with pytest.raises(ValueError, match="give the target as a fraction"):
        VLMTrainingModule(model, ATPPruner(num_layers=8, hidden=8), train_parts="pruner", target_tokens=36)


def test_fitprune_job_on_qwen_writes_a_recipe_that_evaluate_runs(qwen_base, tmp_path):
    """train.py experiment=fitprune_shapes on the Qwen base -> recipe.json -> evaluate.py pruner=fitprune."""
    from atp.lit.run import run_job

    data = tmp_path / "data"
    content = run_job(
        compose_train(
            [
                "experiment=fitprune_shapes",
                f"model.path={qwen_base}",
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
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={qwen_base}",
                "pruner=fitprune",
                f"pruner.recipe={tmp_path}/fit/recipe.json",
                f"output_dir={tmp_path}/eval",
                "latency_batches=0",
                *tiny_data(data)[:-3],
            ],
        )
    result = run_evaluation(cfg)
    deleted = sum(int(count) for count in content["recipe"].values())
    assert result.visual_tokens_per_layer[-1] == 144 - deleted  # every test image: 144 tokens, the recipe's deletions


def test_the_blank_image_control_refuses_patch_pixel_values():
    from atp.evaluation import _model_inputs

    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(16, 1176), "id": ["a"]}
    with pytest.raises(ValueError, match=r"pixel_values of shape \(16, 1176\).*use blind='noise'"):
        _model_inputs(batch, "cpu", None, blind="blank")
    assert _model_inputs(batch, "cpu", None, blind="noise")["pixel_values"].shape == (16, 1176)
