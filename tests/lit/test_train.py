"""train.py end to end on tiny models: experiments compose and run, resume, DDP, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import atp
from atp.data.llava_format import prompt_loader
from atp.export import load_pruned
from atp.lit.run import MissingAssetError, build_pruner, run_job, run_training

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(  # VLM experiments (the structural ones are tested in test_structural.py)
    p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if not p.stem.startswith("atp_struct")
)
NEEDS_REAL_WEIGHTS = {  # experiment -> the overrides its clear error must name
    "atp_llava": r"model\.path=None.*data\.train_json=None.*Example: python train\.py experiment=atp_llava",
    "fitprune_llava": r"model\.path=None.*fit\.calibration_json=None.*Example: python train\.py "
    r"experiment=fitprune_llava",
    "atp_qwen2_5_vl": r"model\.path=None \(a local Qwen/Qwen2\.5-VL-7B-Instruct directory.*data\.train_json=None.*"
    r"Example: python train\.py experiment=atp_qwen2_5_vl",
    "fitprune_qwen2_5_vl": r"model\.path=None \(a local Qwen/Qwen2\.5-VL-7B-Instruct directory.*"
    r"fit\.calibration_json=None.*Example: python train\.py experiment=fitprune_qwen2_5_vl",
    "atp_llava_next": r"model\.path=None.*data\.train_json=None.*Example: python train\.py experiment=atp_llava_next",
    "fitprune_llava_next": r"model\.path=None.*fit\.calibration_json=None.*Example: python train\.py "
    r"experiment=fitprune_llava_next",
    "atp_internvl3": r"model\.path=None \(a local OpenGVLab/InternVL3-8B-hf directory.*data\.train_json=None.*"
    r"Example: python train\.py experiment=atp_internvl3",
    "fitprune_internvl3": r"model\.path=None \(a local OpenGVLab/InternVL3-8B-hf directory.*"
    r"fit\.calibration_json=None.*Example: python train\.py experiment=fitprune_internvl3",
    "vflowopt_llava": r"model\.path=None.*fit\.calibration_json=None.*Example: python train\.py "
    r"experiment=vflowopt_llava",
}
TESTBED_EXPERIMENTS = ("shapes_base", "shapes_base_qwen", "shapes_base_internvl")  # build their model from scratch
TINY_MODEL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.vision_hidden=32",
    "model.vision_layers=1",
]


class StopAfterSteps(L.Callback):
    """Stops a run after `steps` optimizer steps, as if it were killed right after them."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_data(root: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.train_samples=8",
        "data.pruner_train_samples=8",
        "data.val_samples=4",
        "data.test_samples=4",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
    ]


def train_base(experiment: str, root: Path) -> Path:
    """Train the testbed base of `experiment` for 2 steps on tiny data under `root`; returns its export."""
    cfg = compose_train(
        [
            f"experiment={experiment}",
            f"output_dir={root}/run",
            f"export_dir={root}/model",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "logger=none",
            "trainer.enable_progress_bar=false",
            *TINY_MODEL,
            *tiny_data(root / "data"),
        ]
    )
    metrics = run_training(cfg)
    assert "val/accuracy" in metrics
    return root / "model"


def train_pruner_steps(experiment: str, model_path: Path, run: Path, data: Path, steps: int = 3) -> dict:
    """Train only the pruner of `experiment` on `model_path` for `steps` steps (a checkpoint every step,
    no validation) and export it to `run`/export; returns the training metrics."""
    return run_training(
        compose_train(
            [
                f"experiment={experiment}",
                f"model.path={model_path}",
                f"output_dir={run}",
                f"export_dir={run}/export",
                f"trainer.max_steps={steps}",
                "trainer.val_check_interval=null",
                "trainer.check_val_every_n_epoch=100",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "callbacks.checkpoint.every_n_train_steps=1",
                "module.train_parts=pruner",
                "pruner.hidden=16",
                *tiny_data(data),
            ]
        )
    )


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny testbed model trained for 2 steps with experiment=shapes_base and exported."""
    model = train_base("shapes_base", tmp_path_factory.mktemp("base"))
    assert (model / "config.json").is_file() and (model / "processor_config.json").is_file()
    return model


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_fast_dev_run(experiment, base_model, tmp_path):
    overrides = [
        f"experiment={experiment}",
        "debug=fast_dev_run",
        f"output_dir={tmp_path}",
        "logger=none",
        *tiny_data(tmp_path / "data"),
    ]
    if experiment in NEEDS_REAL_WEIGHTS:
        cfg = compose_train(overrides)
        with pytest.raises(MissingAssetError, match=NEEDS_REAL_WEIGHTS[experiment]):
            run_job(cfg)
        return
    if experiment in TESTBED_EXPERIMENTS:
        overrides += TINY_MODEL
    else:
        overrides.append(f"model.path={base_model}")
    if experiment.startswith("fitprune"):
        overrides += ["fit.calibration_samples=4", "fit.flops_budget=0.9"]
    if experiment.startswith("vflowopt"):
        overrides += ["fit.calibration_samples=4", "fit.calls=2", "fit.initial_points=1"]
    run_job(compose_train(overrides))


def atp_overrides(base_model: Path, output: Path, data: Path, steps: int) -> list[str]:
    return [
        "experiment=atp_llava_shapes",
        f"model.path={base_model}",
        f"output_dir={output}",
        f"export_dir={output}/export",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=100",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_train_steps=1",
        "pruner.hidden=16",
        *tiny_data(data),
    ]


def test_killed_and_resumed_run_equals_unbroken_run(base_model, tmp_path):
    """Same config three ways: unbroken 6 steps; stopped after 3; resumed from the step-3 checkpoint
    (with the target eased in over the first 4 steps, so the budget depends on the step too)."""
    data = tmp_path / "data"

    def overrides(run: str) -> list[str]:
        return [*atp_overrides(base_model, tmp_path / run, data, steps=6), "module.target_warmup=0.67"]

    run_training(compose_train(overrides("unbroken")))
    stop = ["+callbacks.stop._target_=tests.lit.test_train.StopAfterSteps", "+callbacks.stop.steps=3"]
    run_training(compose_train([*overrides("killed"), *stop]))
    checkpoint = tmp_path / "killed/checkpoints/epoch=1-step=3.ckpt"  # mid-epoch: 2 steps per epoch
    assert checkpoint.is_file()
    run_training(compose_train([*overrides("killed"), f"ckpt_path='{checkpoint}'"]))
    unbroken = torch.load(tmp_path / "unbroken/checkpoints/last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=False)
    assert unbroken["global_step"] == resumed["global_step"] == 6
    assert unbroken["state_dict"].keys() == resumed["state_dict"].keys()
    keys = unbroken["state_dict"].keys()
    assert all(k.startswith("pruner.") or "lora_" in k for k in keys)  # the frozen weights are not checkpointed
    assert any(k.startswith("pruner.") for k in keys) and any("lora_" in k for k in keys)  # both trainables are
    initial = torch.load(checkpoint, weights_only=False)["state_dict"]
    for key, value in unbroken["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)
    assert any(not torch.equal(initial[k], v) for k, v in unbroken["state_dict"].items())  # it did train


def test_ddp_two_cpu_processes_keep_identical_atp_parameters(base_model, tmp_path):
    overrides = atp_overrides(base_model, tmp_path / "ddp", tmp_path / "data", steps=3)
    overrides += [
        "strategy=ddp",
        "trainer.devices=2",
        "export=false",
        "+callbacks.ranks._target_=atp.lit.callbacks.SaveTrainablesPerRank",
        f"+callbacks.ranks.dirpath={tmp_path}/ranks",
        f"hydra.run.dir={tmp_path}/hydra",  # keep Hydra's own logs out of the repository's checkpoints/
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(tmp_path / "ranks" / "trainables_rank0.safetensors")
    rank1 = load_file(tmp_path / "ranks" / "trainables_rank1.safetensors")
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_target_tokens_above_the_visual_tokens(base_model, tmp_path):
    cfg = compose_train([*atp_overrides(base_model, tmp_path, tmp_path / "data", 1), "module.target_tokens=600"])
    with pytest.raises(ValueError, match=r"target_tokens=600.* outside \(0, 576\]"):
        run_training(cfg)


def test_unknown_config_key_is_refused():
    with pytest.raises(Exception, match="no_such_key"):
        compose_train(["experiment=shapes_base", "module.no_such_key=1"])


def test_experiment_and_debug_values_override_the_defaults():
    cfg = compose_train(["experiment=shapes_base", "debug=fast_dev_run"])
    assert cfg.experiment_name == "shapes_base" and cfg.export is False and cfg.trainer.fast_dev_run is True
    assert compose_train(["experiment=atp_llava"]).pruner.layers == [4, 14, 24]


@pytest.mark.parametrize(("pruner", "extra"), [("fastv", ["pruner.layer=1"]), ("random", ["pruner.layers=[1]"])])
def test_a_baseline_replaces_the_testbed_atp_settings(pruner, extra):
    """The README's trained controls: `pruner=<baseline>` on atp_llava_shapes builds that
    baseline, with none of ATP's testbed settings left in its config."""
    cfg = compose_train(["experiment=atp_llava_shapes", f"pruner={pruner}", *extra])
    assert build_pruner(cfg.pruner, num_layers=8).name == pruner
    assert compose_train(["experiment=atp_llava_shapes"]).pruner.layers == [1, 3]


@pytest.mark.parametrize("strategy", sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")))
def test_strategy_configs_name_real_lightning_strategies(strategy):
    from hydra.utils import get_class, instantiate

    spec = compose_train([f"strategy={strategy}"]).strategy
    if spec._target_ is None:
        return
    cls = get_class(spec._target_)
    assert issubclass(cls, L.pytorch.strategies.Strategy)
    if strategy == "ddp":
        assert isinstance(instantiate(spec), cls)


def test_wandb_logger_runs_offline_without_an_account(base_model, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = atp_overrides(base_model, tmp_path / "run", tmp_path / "data", steps=1)
    run_training(compose_train([*overrides, "logger=csv_wandb", "export=false"]))
    assert list((tmp_path / "run").rglob("*.wandb")), "no offline W&B run was written"


def test_evaluate_entry_point_on_an_export(base_model, tmp_path):
    from atp.lit.evaluate_run import run_evaluation

    data = tmp_path / "data"
    run_training(compose_train(atp_overrides(base_model, tmp_path / "run", data, steps=1)))
    # the exported pruner is the trained one: the final checkpoint's pruner weights, file and loaded
    final = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert final["global_step"] == 1
    trained = {k.removeprefix("pruner."): v for k, v in final["state_dict"].items() if k.startswith("pruner.")}
    exported = load_file(tmp_path / "run/export/pruner.safetensors")
    loaded = atp.runtime_of(load_pruned(tmp_path / "run/export")[0]).pruner
    assert trained and exported.keys() == trained.keys() == loaded.state_dict().keys()
    for key, value in trained.items():
        assert torch.equal(exported[key], value) and torch.equal(loaded.state_dict()[key], value), key
    config = json.loads((tmp_path / "run/export/atp_config.json").read_text())
    assert config["pruner"] == loaded.name == "atp" and loaded.build_kwargs() == config["kwargs"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"export_path={tmp_path}/run/export",
                f"output_dir={tmp_path}/eval",
                "latency_repeats=1",
                "latency_batches=1",
                *tiny_data(data)[:-3],
            ],
        )
    result = run_evaluation(cfg)
    assert result.num_samples == 4 and (tmp_path / "eval" / "results.json").is_file()
    assert "atp" in (tmp_path / "eval" / "results.md").read_text()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={base_model}",
                "pruner=fastv",
                "pruner.layer=1",
                f"output_dir={tmp_path}/eval2",
                *tiny_data(data)[:-3],
            ],
        )
    assert run_evaluation(cfg).method.startswith("fastv (layer=1, keep_ratio=0.5")


def test_comparison_benchmark_runs_on_a_tiny_export(base_model, tmp_path):
    data = tmp_path / "data"
    run_training(compose_train(atp_overrides(base_model, tmp_path / "run", data, steps=1)))
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "shapes_comparison.py"),
        "--base",
        str(base_model),
        "--atp",
        str(tmp_path / "run" / "export"),
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "cmp"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in (
        "| unpruned |",
        "| blind control (noise images) |",
        "| blind control (blank images) |",
        "| atp (trained) |",
        "| the export's fine-tuned model, unpruned |",  # the experiment trains LoRA: the export has its own LLM
        "| fastv (cut before layer 1",
        "| random (cut before layer 1",
    ):
        assert row in result.stdout
    assert "VERDICT: " in result.stdout  # the plain verdict line (atp.comparison), also in verdict.txt
    assert (tmp_path / "cmp" / "verdict.txt").read_text().splitlines()[-1].startswith("VERDICT: ")
    assert "prefill latency: median of 5 interleaved rounds" in result.stdout
    for picture in ("tokens_per_layer.png", "tokens_vs_objects.png"):
        assert (tmp_path / "cmp" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())
    timed = [r for r in rows if r["method"].startswith(("atp", "fastv", "random"))]
    assert len(timed) == 3 and all(r["latency_low"] <= r["latency_ratio"] <= r["latency_high"] for r in timed)

    # constant thresholds: keep everything, or only the stride-8 SAP grid after the first module
    num_visual = round(json.loads((tmp_path / "cmp" / "results.json").read_text())[0]["avg_visual_tokens"])
    kwargs = json.loads((tmp_path / "run" / "export" / "atp_config.json").read_text())["kwargs"]
    layers, num_layers = kwargs["layers"], kwargs["num_layers"]
    side = math.isqrt(num_visual)
    stride8 = math.ceil(side / 8) ** 2
    settings = {" ".join(f"{layer}:1.0,{theta_s}" for layer in layers): theta_s for theta_s in ("0.0", "0.9")}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "testbed" / "atp_fixed_thresholds.py"),
        "--atp",
        str(tmp_path / "run" / "export"),
    ]
    command += ["--data", str(data)] + [arg for setting in settings for arg in ("--setting", setting)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = {
        line.split(" | ")[0][2:]: float(line.split(" | ")[2]) for line in result.stdout.splitlines() if ":1.0," in line
    }
    expected = {
        "0.0": num_visual,
        "0.9": (num_visual * min(layers) + stride8 * (num_layers - min(layers))) / num_layers,
    }
    assert {setting: tokens[setting] for setting in settings} == {
        setting: pytest.approx(expected[theta_s], abs=0.05) for setting, theta_s in settings.items()
    }


class ModeRecorder(L.Callback):
    """Appends, for every training and validation batch, the phase, the global step, the runtime's
    mode, the mode the batch's forward ran in and whether the pruner was in training mode, to the
    JSON-lines file `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _record(self, phase: str, trainer, module) -> None:
        entry = {
            "phase": phase,
            "step": trainer.global_step,
            "runtime": atp.runtime_of(module.model).mode,
            "forward": atp.stats(module.model).mode,
            "training": module.pruner.training,
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._record("train", trainer, module)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._record("val", trainer, module)


def test_training_continues_after_a_mid_epoch_validation(base_model, tmp_path):
    """Validation attaches the pruner in drop mode; the next training step must be back in mask mode.
    The logged metrics are the values recomputed from the parts and from the exported model."""
    data = tmp_path / "data"
    overrides = atp_overrides(base_model, tmp_path / "run", data, steps=3)
    overrides = [o for o in overrides if not o.startswith(("trainer.val_check_interval", "trainer.check_val"))]
    record = tmp_path / "modes.jsonl"
    recorder = ["+callbacks.modes._target_=tests.lit.test_train.ModeRecorder", f"+callbacks.modes.path={record}"]
    metrics = run_training(compose_train([*overrides, "trainer.val_check_interval=1", *recorder]))
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    phases = [(e["phase"], e["step"]) for e in entries]
    assert ("val", 1) in phases and ("train", 2) in phases  # a validation after step 1 of a 2-batch epoch
    assert phases.index(("train", 2)) > phases.index(("val", 1))
    assert max(step for phase, step in phases if phase == "val") == 3  # the last one sees the final weights
    for entry in entries:
        expected = ("mask", "mask", True) if entry["phase"] == "train" else ("drop", "drop", False)
        assert (entry["runtime"], entry["forward"], entry["training"]) == expected, entry
    parts = metrics["train/loss_lm"] + metrics["train/loss_atp"] + metrics["train/loss_target"]
    assert metrics["train/loss"] == pytest.approx(parts, rel=1e-6)
    # the last validation, recomputed on the export (the final pruner, LoRA merged) in drop mode
    model, processor = load_pruned(tmp_path / "run" / "export", mode="drop")
    tokenizer = processor.tokenizer
    correct, tokens = [], []
    for batch in prompt_loader(data / "val.json", data / "images", processor, batch_size=4):
        with torch.no_grad():
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        answers = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in batch["answer"]]
        correct += (logits[:, -1].argmax(-1) == torch.tensor(answers)).tolist()
        tokens += atp.stats(model).average_visual_tokens().tolist()
    assert len(correct) == 4
    assert metrics["val/accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-6)
    assert metrics["val/avg_visual_tokens"] == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)


def test_fitprune_job_writes_a_recipe_that_evaluate_runs(base_model, tmp_path, monkeypatch, capsys):
    """train.py experiment=fitprune_shapes -> recipe.json (+ offline W&B chart) -> evaluate.py pruner=fitprune."""
    from atp.lit.evaluate_run import run_evaluation

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    data = tmp_path / "data"
    overrides = [
        "experiment=fitprune_shapes",
        f"model.path={base_model}",
        f"output_dir={tmp_path}/fit",
        "fit.calibration_samples=6",
        "fit.batch_size=4",
        "fit.flops_budget=0.8",
        "logger=csv_wandb",
        *tiny_data(data),
    ]
    content = run_job(compose_train(overrides))
    recipe = tmp_path / "fit" / "recipe.json"
    assert json.loads(recipe.read_text()) == content
    assert content["calibration_samples"] == 6 and content["flops_ratio"] <= 0.8
    assert "| layer | deleted after it |" in capsys.readouterr().out
    assert list((tmp_path / "fit").rglob("*.wandb")), "no offline W&B run was written"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={base_model}",
                "pruner=fitprune",
                f"pruner.recipe={recipe}",
                f"output_dir={tmp_path}/eval",
                "latency_repeats=1",
                "latency_batches=1",
                *tiny_data(data)[:-3],
            ],
        )
    result = run_evaluation(cfg)
    assert result.method.startswith("fitprune") and result.flops_ratio < 1.0


def test_vflowopt_job_writes_a_recipe_that_evaluate_runs(base_model, tmp_path, capsys):
    """train.py experiment=vflowopt_shapes -> recipe.json -> evaluate.py pruner=vflowopt pruner.recipe=..."""
    from atp.lit.evaluate_run import run_evaluation

    data = tmp_path / "data"
    overrides = [
        "experiment=vflowopt_shapes",
        f"model.path={base_model}",
        f"output_dir={tmp_path}/fit",
        "fit.calibration_samples=5",
        "fit.batch_size=4",
        "fit.calls=4",
        "fit.initial_points=2",
        "logger=csv",
        *tiny_data(data),
    ]
    content = run_job(compose_train(overrides))
    recipe = tmp_path / "fit" / "recipe.json"
    assert json.loads(recipe.read_text()) == content
    assert content["calibration_samples"] == 5 and len(content["trials"]) == 4
    assert content["similarity"] == max(t["similarity"] for t in content["trials"])
    assert "VFlowOpt setting for an average share of 0.250" in capsys.readouterr().out
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={base_model}",
                "pruner=vflowopt",
                f"pruner.recipe={recipe}",
                f"output_dir={tmp_path}/eval",
                "latency_repeats=1",
                "latency_batches=1",
                *tiny_data(data)[:-3],
            ],
        )
    result = run_evaluation(cfg)
    assert result.method.startswith("vflowopt") and result.flops_ratio < 1.0
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=[
                f"model_path={base_model}",
                "pruner=vflowopt",
                "pruner.vision_layer=-1",
                "budget_tokens=64",
                "fit_calibration_samples=4",
                "vflowopt_calls=3",
                "vflowopt_initial_points=2",
                f"output_dir={tmp_path}/budget",
                "latency_repeats=1",
                "latency_batches=1",
                *tiny_data(data)[:-3],
            ],
        )
    budgeted = run_evaluation(cfg)
    assert budgeted.method == "vflowopt @ 64 tokens" and budgeted.flops_ratio < 1.0


def test_budget_evaluations_collect_into_one_table(base_model, tmp_path):
    """evaluate.py budget_tokens=64 for FastV and FitPrune (fitted to FastV's FLOPs), then one table."""
    from atp.lit.evaluate_run import run_evaluation

    results = {}
    for name in ("fastv", "fitprune"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                config_name="evaluate",
                overrides=[
                    f"model_path={base_model}",
                    f"pruner={name}",
                    "budget_tokens=64",
                    "fit_calibration_samples=4",
                    f"output_dir={tmp_path}/sweep/{name}",
                    "latency_repeats=1",
                    "latency_batches=1",
                    *tiny_data(tmp_path / "data")[:-3],
                ],
            )
        results[name] = run_evaluation(cfg)
    assert results["fastv"].method == "fastv @ 64 tokens"
    assert results["fitprune"].flops_ratio <= results["fastv"].flops_ratio + 0.02  # fitted on other prompts
    table = tmp_path / "table.md"
    command = [
        sys.executable,
        str(ROOT / "benchmarks/collect_results.py"),
        str(tmp_path / "sweep"),
        "--out",
        str(table),
    ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    rows = [line for line in table.read_text().splitlines() if line.startswith("| f")]
    assert [row.split(" | ")[0] for row in rows] == ["| fastv @ 64 tokens", "| fitprune @ 64 tokens"]


def test_hard_finetune_freezes_the_pruner_while_lora_trains(base_model, tmp_path):
    """4 steps, the last 2 in the hard phase: the checkpoints after steps 2 to 4 hold the same pruner."""
    overrides = atp_overrides(base_model, tmp_path, tmp_path / "data", steps=4)
    run_training(compose_train([*overrides, "module.hard_finetune=0.5"]))
    states = [
        torch.load(tmp_path / f"checkpoints/epoch={(step - 1) // 2}-step={step}.ckpt", weights_only=False)["state_dict"]
        for step in range(1, 5)
    ]
    pruner_keys = [k for k in states[0] if k.startswith("pruner.")]
    lora_keys = [k for k in states[0] if "lora_" in k]
    assert pruner_keys and lora_keys
    assert any(not torch.equal(states[0][k], states[1][k]) for k in pruner_keys)  # the soft phase trains it
    for later in states[2:]:
        assert all(torch.equal(states[1][k], later[k]) for k in pruner_keys)
        assert any(not torch.equal(states[1][k], later[k]) for k in lora_keys)


def test_soft_recipe_is_the_measured_command():
    """experiment=atp_llava_shapes_soft composes to the overrides of the README's measured runs."""
    measured = [
        "experiment=atp_llava_shapes",
        "pruner.budget_gradients=offset",
        "pruner.straight_through=false",
        "pruner.tau=40",
        "module.budget_offset_lr=0.1",
        "module.pruner_betas=[0.9,0.95]",
        "experiment_name=atp_llava_shapes_soft",
    ]
    recipe = compose_train(["experiment=atp_llava_shapes_soft"])
    assert recipe == compose_train(measured)
    assert recipe.pruner.tau == 40 and recipe.pruner.layers == [1, 3] and recipe.trainer.max_steps == 150


def test_kept_token_curves_reach_wandb_as_one_chart(base_model, tmp_path, monkeypatch):
    """W&B offline: the chart logged at the end holds, per ATP module, the (step, kept tokens)
    values the CSV logger recorded for atp/kept_tokens_layer<l>, and the target."""
    import csv

    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    charts, real_log = [], wandb.sdk.wandb_run.Run.log

    def recording_log(self, data, *args, **kwargs):
        charts.extend(value for key, value in data.items() if key == "atp/kept_tokens_per_module")
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", recording_log)
    overrides = atp_overrides(base_model, tmp_path / "run", tmp_path / "data", steps=3)
    run_training(compose_train([*overrides, "logger=csv_wandb", "export=false", "trainer.log_every_n_steps=1"]))
    assert charts, "no kept-token chart was logged to W&B"
    table = charts[-1].table
    assert table.columns == ["step", "lineKey", "lineVal"]
    drawn: dict[str, list[float]] = {}
    for _step, key, value in table.data:
        drawn.setdefault(key, []).append(value)
    (metrics_file,) = (tmp_path / "run").rglob("metrics.csv")
    recorded: dict[str, list[float]] = {}
    for row in csv.DictReader(metrics_file.open()):
        for column, value in row.items():
            if value and (column.startswith("atp/kept_tokens_layer") or column == "atp/target_tokens"):
                recorded.setdefault(column.removeprefix("atp/"), []).append(float(value))
    assert sorted(drawn) == sorted(recorded) == ["kept_tokens_layer1", "kept_tokens_layer3", "target_tokens"]
    for key, values in recorded.items():
        assert len(values) == 3 and drawn[key] == pytest.approx(values, rel=1e-6)
