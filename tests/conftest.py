"""Shared fixtures: compose the real configs, run the real pipeline, read files back independently."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch  # noqa: F401 - registers the config resolvers
from gradwatch.pipeline import run

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
QUIET = ["trainer.enable_progress_bar=false"]


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
    return cfg


def train(overrides: list[str], run_dir: Path) -> float:
    """One run through Hydra compose and gradwatch.pipeline.run, as train.py does it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_cfg([*QUIET, *overrides], run_dir)
    HydraConfig.instance().set_config(cfg)
    return run(cfg)


def read_tb(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in a run's TensorBoard files, by tag then step (EventAccumulator, no sampling)."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def train_py(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, run from `cwd` with outputs under it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
