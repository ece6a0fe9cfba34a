"""Train with Hydra + Lightning:  python train.py experiment=atp_llava_shapes [overrides]."""

import hydra
from omegaconf import DictConfig

from atp.lit.run import run_training


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
