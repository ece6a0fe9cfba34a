"""`make quickstart` runs the README's ATP recipe (atp_llava_shapes_soft), shortened only in steps."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def makefile_target(name: str) -> tuple[dict[str, str], list[str]]:
    """(the Makefile's `X ?= value` defaults, the target's recipe lines with continuations joined)."""
    text = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+) \?= (.*)$", text, flags=re.M))
    body = re.search(rf"^{name}:.*\n((?:\t.*\n)+)", text, flags=re.M)
    assert body is not None, f"no target {name!r} in the Makefile"
    lines = body.group(1).replace("\\\n", " ").splitlines()
    return defaults, [line.strip() for line in lines]


def expand(line: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: defaults.get(m.group(1), m.group(0)), line)


def test_quickstart_trains_the_soft_recipe_and_compares_its_export():
    defaults, lines = makefile_target("quickstart")
    atp_line = next(expand(line, defaults) for line in lines if "train.py experiment=atp" in line)
    overrides = shlex.split(atp_line.split("train.py", 1)[1])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        quick = compose(config_name="train", overrides=overrides)
        steps = int(defaults["QUICK_ATP_STEPS"])
        readme = compose(
            config_name="train",
            overrides=[
                "experiment=atp_llava_shapes_soft",
                "run_name=quickstart",
                f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}",
            ],
        )
    assert quick == readme  # the soft recipe, nothing changed but the steps
    assert quick.experiment_name == "atp_llava_shapes_soft" and quick.pruner.tau == 40
    compare = next(expand(line, defaults) for line in lines if "shapes_comparison.py" in line)
    assert f"--atp checkpoints/{quick.experiment_name}/{quick.run_name}/export" in compare
    assert f"--max-samples {defaults['QUICK_SAMPLES']}" in compare
