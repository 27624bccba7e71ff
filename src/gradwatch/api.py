"""Python entry points to the same pipeline `train.py` runs, for notebooks, benchmarks and tests.

    >>> from gradwatch.api import train                                  # doctest: +SKIP
    >>> train(["experiment=seed_tiny_relu"], run_dir="outputs/tiny")      # doctest: +SKIP
    0.0000128...
"""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from gradwatch.config.cli import CONF_DIR
from gradwatch.training.pipeline import run


def compose_config(overrides: list[str], run_dir: Path | str | None = None, conf_dir: Path = CONF_DIR) -> DictConfig:
    """The config `train.py OVERRIDES` would run, with the Hydra node (its run folder set to `run_dir`)."""
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
    return cfg


def train(overrides: list[str], run_dir: Path | str, conf_dir: Path = CONF_DIR) -> float:
    """One run into `run_dir`, as `python train.py OVERRIDES hydra.run.dir=RUN_DIR` would do it."""
    run_dir = Path(run_dir)
    cfg = compose_config(overrides, run_dir, conf_dir)
    # What Hydra's job writes first: the resolved config and the overrides as typed.
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(task, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    HydraConfig.instance().set_config(cfg)
    return run(cfg)
