"""Train with Hydra + Lightning:  python train.py experiment=atp_llava_shapes [overrides].

experiment=fitprune_shapes / fitprune_llava fit a FitPrune recipe instead (job=fitprune).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from atp.lit.cli import exit_on_unknown_keys
from atp.lit.run import run_job

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    exit_on_unknown_keys("train.py", CONF, "train", sys.argv[1:])
    main()
