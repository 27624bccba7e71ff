"""Distributed runs: `trainer.strategy=ddp trainer.devices=2` on CPU (gloo) trains the same run as one
process, written once by rank 0, and survives an interrupt and a resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwatch.storage.parquet import read_metrics

from conftest import REPO, read_tb, train_py

pytestmark = pytest.mark.slow

# ReLU layers that lose units, mini-batches shuffled each epoch: every part of the data path counts.
CONFIG = ["model=mlp", "model.hidden=[16,16]", "model.bias_init=-0.3", "dataset=sum_x1_x2", "dataset.size=64",
          "dataset.batch_size=16", "optimizer.lr=0.1", "seed=5", "trainer.enable_progress_bar=false",
          "log.flush_every_n_steps=5"]
DDP = ["trainer.strategy=ddp", "trainer.devices=2"]
STEPS = 40


def _curves(run_dir: Path) -> dict[str, dict[int, float]]:
    tb = read_tb(run_dir)
    return {tag: values for tag, values in tb.items()
            if tag == "train/loss" or tag.endswith("/norm") or tag.endswith("/dead_fraction")
            or tag.endswith("/zero_fraction") or tag == "grad/global_norm"}


def _assert_close(got: dict[int, float], want: dict[int, float], tag: str) -> None:
    assert sorted(got) == sorted(want), tag
    for step, value in want.items():
        assert got[step] == pytest.approx(value, rel=1e-4, abs=1e-7), (tag, step)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = train_py([*CONFIG, f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_two_processes_equal_one(tmp_path, one_process):
    run_dir = tmp_path / "run"
    result = train_py([*CONFIG, *DDP, f"trainer.max_steps={STEPS}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    want, got = _curves(one_process), _curves(run_dir)
    assert set(got) == set(want) and "act/1/dead_fraction" in got and "grad/0.weight/norm" in got
    for tag in want:
        _assert_close(got[tag], want[tag], tag)
    # Some units are dead and some are not: the fractions are over the global batch, not a shard.
    dead = want["act/1/dead_fraction"]
    assert 0 < min(dead.values()) or 0 < max(dead.values()) < 1

    # Written once, by rank 0: one event file, each step once, one parquet sink, one record, one line.
    assert len(list((run_dir / "tb").iterdir())) == 1
    metrics = read_metrics(run_dir)
    loss_steps = metrics.loc[metrics["tag"] == "train/loss", "step"].tolist()
    assert sorted(loss_steps) == list(range(STEPS))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == STEPS
    assert record["final_loss"] == pytest.approx(want["train/loss"][STEPS - 1], rel=1e-5)
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("gradwatch:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gradwatch: {record['verdict']} after {STEPS} steps")


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path):
    result = train_py([*CONFIG, *DDP, "dataset.batch_size=15", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/r"],
                      cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("gradwatch: dataset.batch_size=15 is not valid: allowed is a batch size that 2")


def test_interrupt_then_resume(tmp_path, one_process):
    """Ctrl-C reaches both processes (a terminal signals the whole process group); the resumed
    run completes with every step once and the one-process curve."""
    run_dir = tmp_path / "run"
    steps = 4000  # long enough to interrupt
    args = [sys.executable, str(REPO / "train.py"), *CONFIG, *DDP, f"trainer.max_steps={steps}",
            "checkpoint.every_n_steps=20", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    parts = run_dir / "metrics"
    while not (run_dir / "checkpoints" / "last.ckpt").exists() or len(list(parts.glob("*.parquet"))) < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    stopped = record["steps"]
    assert 0 < stopped < steps

    resumed = train_py([*CONFIG, *DDP, f"trainer.max_steps={stopped + 20}", f"hydra.run.dir={run_dir}",
                        "ckpt_path=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == stopped + 20
    losses = read_tb(run_dir)["train/loss"]
    assert sorted(losses) == list(range(stopped + 20))  # no step lost, none twice
    want = read_tb(one_process)["train/loss"]
    for step in range(min(STEPS, stopped)):
        assert losses[step] == pytest.approx(want[step], rel=1e-4)

