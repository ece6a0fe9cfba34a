"""Evaluate a model with any pruner:  python evaluate.py export_path=... | pruner=fastv ..."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from atp.lit.cli import exit_on_unknown_keys, no_empty_run_dir_on_failure, register_help_resolver
from atp.lit.evaluate_run import run_evaluation

CONF = Path(__file__).resolve().parent / "conf"
register_help_resolver(CONF)  # --help lists only the groups evaluate.py takes (conf/evaluate.yaml)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with no_empty_run_dir_on_failure(HydraConfig.get().runtime.output_dir, job_name="evaluate"):
        run_evaluation(cfg)


if __name__ == "__main__":
    exit_on_unknown_keys("evaluate.py", CONF, "evaluate", sys.argv[1:])
    main()
