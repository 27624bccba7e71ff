"""Runs that survive: SIGINT, SIGTERM and kill -9 part way, then resume, with nothing lost."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gradwatch.storage.parquet import read_metrics

from conftest import REPO, read_tb, train_py

pytestmark = pytest.mark.slow

STEPS = 1200
RUN = ["model=mlp", "model.hidden=[128,128]", "dataset=sum_x1_x2", "dataset.size=256", "optimizer.lr=0.02",
       "seed=3", f"trainer.max_steps={STEPS}", "log.flush_every_n_steps=25", "checkpoint.every_n_steps=100",
       "trainer.enable_progress_bar=false"]


def _default_sigint() -> None:
    # A shell without job control starts background commands (CI's, perhaps) with SIGINT
    # ignored, and Python keeps it ignored; the run under test must get Ctrl-C as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _start(run_dir: Path, extra: list[str] | tuple = ()) -> subprocess.Popen:
    return _popen([sys.executable, str(REPO / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *extra], run_dir.parent)


def _wait_for_parts(run_dir: Path, proc: subprocess.Popen, parts: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list((run_dir / "metrics").glob("part-*.parquet"))) < parts:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run logged nothing in time"
        time.sleep(0.02)


def _losses(run_dir: Path) -> dict[int, float]:
    return read_tb(run_dir)["train/loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same config, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train_py([*RUN, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_then_resume_gives_the_uninterrupted_curve(tmp_path, reference, sig, code):
    run_dir = tmp_path / "run"
    run_dir.parent.mkdir(exist_ok=True)
    proc = _start(run_dir)
    _wait_for_parts(run_dir, proc, parts=3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err

    record = json.loads((run_dir / "run.json").read_text())
    stopped = record["steps"]
    assert record["status"] == "interrupted"
    assert record["error"] == f"interrupted at step {stopped} ({sig.name})"  # the signal, not Lightning's exception
    assert f"gradwatch: interrupted at step {stopped} ({sig.name})" in err
    assert 75 <= stopped < STEPS
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == stopped
    # Everything up to the interruption was flushed, in both sinks.
    assert sorted(_losses(run_dir)) == list(range(stopped))
    metrics = read_metrics(run_dir)
    assert sorted(metrics.loc[metrics["tag"] == "train/loss", "step"]) == list(range(stopped))

    resumed = train_py([*RUN, f"hydra.run.dir={run_dir}", "ckpt_path=last"], cwd=run_dir.parent)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((run_dir / "run.json").read_text())
    expected = _losses(reference)
    assert record["status"] == "completed" and record["steps"] == STEPS
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(STEPS))  # no step lost, none twice
    assert max(abs(losses[s] - expected[s]) for s in range(STEPS)) <= 1e-6
    assert record["final_loss"] == pytest.approx(json.loads((reference / "run.json").read_text())["final_loss"],
                                                 abs=1e-6)
    metrics = read_metrics(run_dir)
    parquet_loss = metrics[metrics["tag"] == "train/loss"].set_index("step")["value"]
    assert sorted(parquet_loss.index) == list(range(STEPS))
    assert max(abs(parquet_loss[s] - expected[s]) for s in range(STEPS)) <= 1e-6


@pytest.mark.parametrize(("cadence", "parts"), [
    ((), 6),  # flush every 25 steps, checkpoint every 100: killed past the checkpoint at step 100
    # Flushes only when a checkpoint is saved (every 60 steps): nothing before it may be lost.
    (("log.flush_every_n_steps=100000", "log.flush_every_s=3600", "checkpoint.every_n_steps=60"), 2),
])
def test_kill_9_keeps_what_was_flushed_and_the_summary_reads_it(tmp_path, reference, cadence, parts):
    run_dir = tmp_path / "sweep" / "0_run"
    run_dir.parent.mkdir()
    proc = _start(run_dir, cadence)
    _wait_for_parts(run_dir, proc, parts=parts)
    proc.kill()
    proc.wait(timeout=60)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    flushed = read_metrics(run_dir)
    flushed_loss = flushed[flushed["tag"] == "train/loss"].set_index("step")["value"]
    assert len(flushed_loss) >= 75

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), str(run_dir.parent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(run_dir.parent / "summary.csv").iloc[0]
    assert row["status"] == "running"
    assert row["steps"] == flushed_loss.index.max() + 1
    assert row["final_loss"] == flushed_loss[flushed_loss.index.max()]
    # TensorBoard reads the same flushed steps.
    assert set(_losses(run_dir)) >= set(flushed_loss.index)

    # Resuming from the periodic checkpoint replaces the steps logged after it, once each.
    checkpoint_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert set(range(checkpoint_at)) <= set(flushed_loss.index)  # the checkpoint never runs ahead of the logs

    resumed = train_py([*RUN, f"hydra.run.dir={run_dir}", *cadence, "ckpt_path=last"], cwd=run_dir.parent)
    assert resumed.returncode == 0, resumed.stderr
    losses, expected = _losses(run_dir), _losses(reference)
    assert sorted(losses) == list(range(STEPS))
    assert max(abs(losses[s] - expected[s]) for s in range(STEPS)) <= 1e-6
    metrics = read_metrics(run_dir)
    assert sorted(metrics.loc[metrics["tag"] == "train/loss", "step"]) == list(range(STEPS))


def test_sigint_stops_a_sweep_after_the_current_run_is_recorded(tmp_path):
    args = [sys.executable, str(REPO / "train.py"), "-m", *RUN, "seed=1,2,3"]
    proc = _popen(args, tmp_path)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("outputs/multirun/*/*/000_*/metrics/part-000002.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    runs = sorted(tmp_path.glob("outputs/multirun/*/*/*_*"))
    assert [p.name[0] for p in runs] == ["0"]  # the sweep went no further
    assert json.loads((runs[0] / "run.json").read_text())["status"] == "interrupted"


def test_sigterm_before_the_training_loop_is_recorded(tmp_path):
    """From the moment run.json says `running`, SIGTERM ends the run as interrupted (exit 143),
    also while Lightning is still setting up and has no handler of its own."""
    run_dir = tmp_path / "run"
    run_dir.parent.mkdir(exist_ok=True)
    proc = _start(run_dir)
    deadline = time.monotonic() + 120
    while not (run_dir / "run.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
