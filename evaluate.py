"""Evaluate a model with any pruner:  python evaluate.py export_path=... | pruner=fastv ..."""

import hydra
from omegaconf import DictConfig

from atp.lit.evaluate_run import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
