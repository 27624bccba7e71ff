"""Shared fixtures: compose the real configs, run the real pipeline, read files back independently.

The helpers are plain functions (importable as `from conftest import train`) and fixtures
(`train_run`, `tb_scalars`, `base_cfg`, ...). Every run.json the suite writes is read back as
strict JSON when the session ends (`strict_run_json`).
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's kernels (gradwatch.telemetry.gpu) run on CPU tensors in its
# interpreter; triton reads this once, when imported (Lightning imports it), so it is set first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from omegaconf import DictConfig  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch  # noqa: F401 - registers the config resolvers
from gradwatch.api import compose_config
from gradwatch.api import train as api_train
from gradwatch.config.errors import ConfigError
from gradwatch.storage.paths import RunPaths
from gradwatch.training.pipeline import RunFailed, exit_code

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
QUIET = ["trainer.enable_progress_bar=false"]


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    return compose_config(overrides, run_dir, CONF)


def train(overrides: list[str], run_dir: Path) -> float:
    """One run through Hydra compose and gradwatch.training.pipeline.run; a refused or failed run
    prints its line and exits as train.py does."""
    try:
        return api_train([*QUIET, *overrides], run_dir, CONF)
    except (ConfigError, RunFailed) as err:
        print(f"gradwatch: {err}", file=sys.stderr)
        raise SystemExit(exit_code(err)) from None


def read_tb(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in a run's TensorBoard files, by tag then step (EventAccumulator, no sampling)."""
    acc = EventAccumulator(str(RunPaths(run_dir).tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_layout(run_dir: Path) -> dict[str, dict[str, list[str]]]:
    """A run's custom scalars layout, as TensorBoard reads it: by category, by chart, the chart's tag regexes."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(str(RunPaths(run_dir).tb), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def train_py(args: list[str], cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess, run from `cwd` with outputs under it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def strict_json(path: Path):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(name: str):
        raise ValueError(f"{path}: non-finite number {name} in strict JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to compare a folder before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def strict_run_json(tmp_path_factory):
    """Every run.json the suite writes is strict JSON (no NaN/Infinity), checked at the end."""
    yield
    base = tmp_path_factory.getbasetemp()
    for path in base.rglob(RunPaths.RECORD):
        try:
            json.loads(path.read_text())
        except ValueError:
            continue  # a file a test broke on purpose
        strict_json(path)


@pytest.fixture(scope="session")
def base_cfg() -> DictConfig:
    """The default config, composed once (read-only: tests that change it compose their own)."""
    return compose_cfg([])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def train_run() -> Callable[[list[str], Path], float]:
    return train


@pytest.fixture
def tb_scalars() -> Callable[[Path], dict[str, dict[int, float]]]:
    return read_tb


@pytest.fixture
def train_script() -> Callable[..., subprocess.CompletedProcess]:
    return train_py
