"""Python entry points to the same pipeline `train.py` runs, for notebooks, benchmarks and tests.

    >>> from gradwatch.api import train                                  # doctest: +SKIP
    >>> train(["experiment=seed_tiny_relu"], run_dir="outputs/tiny")      # doctest: +SKIP
    0.0000128...

`train` raises what the pipeline raises: `ConfigError` for a refused value, `RunFailed` for a run
that could not be built, failed or was interrupted; a refused command leaves an existing run
folder as it was.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from gradwatch.config.cli import CONF_DIR, compose
from gradwatch.config.errors import ConfigError
from gradwatch.storage.paths import RunPaths
from gradwatch.training.pipeline import EXIT_REFUSED, RunFailed, run


def compose_config(overrides: list[str], run_dir: Path | str | None = None, conf_dir: Path = CONF_DIR) -> DictConfig:
    """The config `train.py OVERRIDES` would run, with the Hydra node (its run folder set to `run_dir`)."""
    cfg = compose(list(overrides), conf_dir, hydra=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
    return cfg


def train(overrides: list[str], run_dir: Path | str, conf_dir: Path = CONF_DIR) -> float:
    """One run into `run_dir`, as `python train.py OVERRIDES hydra.run.dir=RUN_DIR` would do it;
    returns the final loss (what Hydra's sweepers minimise)."""
    paths = RunPaths(run_dir)
    cfg = compose_config(overrides, paths.root, conf_dir)
    snapshot = paths.snapshot() if paths.is_run() else None
    # What Hydra's job writes first: the resolved config, Hydra's node and the overrides as typed.
    paths.hydra.mkdir(parents=True, exist_ok=True)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(task, paths.config)
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), paths.hydra_config)
    OmegaConf.save(OmegaConf.create(list(overrides)), paths.overrides)
    HydraConfig.instance().set_config(cfg)
    try:
        return run(cfg).value
    except (ConfigError, RunFailed) as err:
        if snapshot is not None and (isinstance(err, ConfigError) or err.exit_code == EXIT_REFUSED):
            snapshot.restore()
        raise
