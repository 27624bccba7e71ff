"""Train a network with gradient telemetry: `python train.py model=mlp optimizer.lr=0.01`.

Sweeps: `python train.py -m optimizer.lr=0.001,0.01,0.1 seed=0,1,2`. See README.md.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from gradwatch.config.cli import precheck
from gradwatch.training.pipeline import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    precheck(conf_dir=Path(__file__).parent / "conf")
    main()
