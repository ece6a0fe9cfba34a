"""train.py / evaluate.py as a newcomer meets them: typo'd keys, a missing model, --help, the
progress bar's description."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from atp.lit.cli import config_keys, no_empty_run_dir_on_failure, unknown_key_error

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize(
    "script,config,args,unknown,suggested",
    [
        ("evaluate.py", "evaluate", ["max_sample=10"], "max_sample", "max_samples"),
        (
            "evaluate.py",
            "evaluate",
            ["pruner=fastv", "pruner.keep_ration=0.3"],
            "pruner.keep_ration",
            "pruner.keep_ratio",
        ),
        (
            "train.py",
            "train",
            ["experiment=atp_llava_shapes", "trainer.max_step=3"],
            "trainer.max_step",
            "trainer.max_steps",
        ),
        ("train.py", "train", ["modle.path=x"], "modle", "model"),
        ("train.py", "train", ["-m", "experiment=shapes_base", "seeed=0,1"], "seeed", "seed"),
    ],
)
def test_an_unknown_key_is_named_with_the_closest_valid_keys(script, config, args, unknown, suggested):
    message = unknown_key_error(script, CONF, config, args)
    assert f"unknown config key '{unknown}'" in message
    close = message.split("Did you mean: ")[1].split("?")[0].split(", ")
    assert suggested in close
    choices = [a.split(",")[0] for a in args if "=" in a and (CONF / a.split("=")[0]).is_dir()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # every suggestion exists
        keys = set(config_keys(compose(config_name=config, overrides=choices)))
    assert set(close) <= keys


@pytest.mark.parametrize(
    "script,config,args",
    [
        ("train.py", "train", ["experiment=shapes_base", "trainer.max_steps=140", "trainer.val_check_interval=140"]),
        ("train.py", "train", ["experiment=fitprune_shapes", "fit.calibration_samples=3", "model.dtype=bfloat16"]),
        ("train.py", "train", ["+extra=1", "~logger", "hydra.run.dir=x", "hydra/launcher=basic"]),
        ("train.py", "train", ["--cfg", "job", "no_such_key=1"]),  # flags: Hydra's business
        ("train.py", "train", ["pruner=no_such_pruner"]),  # a wrong group option: Hydra lists the options
        (
            "evaluate.py",
            "evaluate",
            ["-m", "pruner=fastv,random", "budget_tokens=192,64", "max_samples=3", "pruner.keep_ratio=0.5"],
        ),
        ("evaluate.py", "evaluate", ["model_path=/missing", "data.root=/tmp/x"]),
    ],
)
def test_valid_overrides_pass(script, config, args):
    assert unknown_key_error(script, CONF, config, args) is None


def test_the_unknown_key_check_agrees_with_hydra():
    """Every key the check calls unknown, Hydra refuses too; every key it accepts composes."""
    refused, accepted = (
        ("trainer.max_step=3", "module.lerning_rate=1", "data.batchsize=2"),
        ("trainer.max_steps=3", "module.lr=1", "data.batch_size=2"),
    )
    for override in refused:
        assert unknown_key_error("train.py", CONF, "train", ["experiment=atp_llava_shapes", override])
    for override in accepted:
        assert unknown_key_error("train.py", CONF, "train", ["experiment=atp_llava_shapes", override]) is None
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for override in refused:
            with pytest.raises(Exception, match="Could not override"):
                compose(config_name="train", overrides=["experiment=atp_llava_shapes", override])
        for override in accepted:
            compose(config_name="train", overrides=["experiment=atp_llava_shapes", override])


def test_train_py_refuses_a_typo_before_hydra_runs(tmp_path):
    result = run_script("train.py", "experiment=shapes_base", "trainer.max_step=3", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    assert "unknown config key 'trainer.max_step'" in result.stderr and "trainer.max_steps" in result.stderr
    assert "use '+" not in result.stderr  # Hydra's hint to add the typo as a new key
    assert not (tmp_path / "run").exists()


def test_evaluate_py_missing_model_names_its_own_key_and_leaves_no_folder(tmp_path):
    result = run_script("evaluate.py", "model_path=/missing", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Set model_path" in result.stderr and "model.path" not in result.stderr
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_run_keeps_a_folder_with_anything_else_in_it(tmp_path):
    hydra_only, with_results = tmp_path / "a", tmp_path / "b"
    for folder in (hydra_only, with_results):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("{}")
        (folder / "evaluate.log").write_text("")
    (with_results / "results.json").write_text("{}")
    for folder in (hydra_only, with_results):
        with pytest.raises(RuntimeError), no_empty_run_dir_on_failure(folder, job_name="evaluate"):
            raise RuntimeError("failed")
    assert not hydra_only.exists() and (with_results / "results.json").is_file()
    with no_empty_run_dir_on_failure(with_results, job_name="evaluate"):
        pass  # success: nothing removed
    assert (with_results / ".hydra").is_dir()


def test_evaluate_help_lists_only_the_groups_it_takes():
    result = run_script("evaluate.py", "--help")
    assert result.returncode == 0, result.stderr
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {line.split(":")[0] for line in groups.splitlines() if ": " in line}
    assert listed == {"data", "pruner"}
    pruners = next(line for line in groups.splitlines() if line.startswith("pruner: "))
    assert pruners.removeprefix("pruner: ").split(", ") == sorted(p.stem for p in (CONF / "pruner").glob("*.yaml"))
    for training_only in ("experiment:", "module:", "strategy:", "trainer:"):
        assert training_only not in groups
    assert "model_path: checkpoints/shapes_base/model" in result.stdout


def test_step_limited_training_shows_steps_not_epoch_minus_two():
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from atp.lit.callbacks import StepProgressBar

    for bar, expected in ((StepProgressBar(), "Epoch 0, step 0/140"), (RichProgressBar(), "Epoch 0/-2")):
        trainer = L.Trainer(max_steps=140, max_epochs=-1, callbacks=[bar], logger=False, accelerator="cpu")
        bar.setup(trainer, None, "fit")
        assert bar._get_train_description(0).strip() == expected  # Lightning's own bar shows the bug
    trainer = L.Trainer(max_epochs=3, callbacks=[bar := StepProgressBar()], logger=False, accelerator="cpu")
    bar.setup(trainer, None, "fit")
    assert bar._get_train_description(1).strip() == "Epoch 1/2"  # epoch-limited runs: unchanged


def test_train_config_gets_the_step_progress_bar(tmp_path):
    from atp.lit.builders import build_trainer
    from atp.lit.callbacks import StepProgressBar

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=shapes_base", f"output_dir={tmp_path}"])
    bars = [c for c in build_trainer(cfg, []).callbacks if isinstance(c, StepProgressBar)]
    assert len(bars) == 1
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.enable_progress_bar=false", f"output_dir={tmp_path}"])
    assert build_trainer(cfg, []).progress_bar_callback is None


@pytest.mark.parametrize(
    "experiment,overrides",
    [
        ("atp_qwen2_5_vl", ["model.path=", "data.train_json=", "data.val_json=", "data.image_folder="]),
        ("fitprune_qwen2_5_vl", ["model.path=", "fit.calibration_json=", "data.image_folder="]),
    ],
)
def test_qwen_experiments_stop_at_once_naming_the_overrides(experiment, overrides, tmp_path):
    result = run_script("train.py", f"experiment={experiment}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in result.stderr
    assert (
        f"Example: python train.py experiment={experiment} " + " ".join(f"{o}..." for o in overrides) in result.stderr
    )
