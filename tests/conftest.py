"""Shared fixtures: compose the real configs, run the real pipeline, read files back independently."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch  # noqa: F401 - registers the config resolvers
from gradwatch.api import compose_config
from gradwatch.api import train as api_train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
QUIET = ["trainer.enable_progress_bar=false"]


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    return compose_config(overrides, run_dir, CONF)


def train(overrides: list[str], run_dir: Path) -> float:
    """One run through Hydra compose and gradwatch.training.pipeline.run, as train.py does it."""
    return api_train([*QUIET, *overrides], run_dir, CONF)


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
