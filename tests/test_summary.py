"""The summariser on folders of real runs, in-process."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from gradwatch.summary.table import configured_thresholds, summarize

from conftest import REPO, train


@pytest.mark.slow  # starts scripts/summarize.py
def test_summarize_uses_each_runs_own_convergence_threshold(tmp_path):
    for name, below in (("0_a", 0.99), ("1_b", 1e-9)):
        train([f"summary.converge_below={below}", "trainer.max_steps=20"], tmp_path / name)
    assert configured_thresholds(tmp_path / "0_a" / ".hydra" / "config.yaml") == (0.99, False)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "summary.csv").set_index("summary.converge_below")
    assert table.loc[0.99, "converged"] and 0 <= table.loc[0.99, "steps_to_converge"] < 20
    assert not table.loc[1e-9, "converged"] and pd.isna(table.loc[1e-9, "steps_to_converge"])
    # An explicit threshold still wins.
    assert summarize(tmp_path, converge_below=1e-9).runs["steps_to_converge"].isna().all()


def test_written_files_have_the_usual_permissions(tmp_path):
    train(["trainer.max_steps=3"], tmp_path / "run")
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp_path / "run" / "run.json", *(tmp_path / "run" / "metrics").glob("*.parquet")]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_swept_columns_come_from_each_runs_resolved_config(tmp_path):
    for name, overrides in (("0_a", ["model=linear", "optimizer.lr=1e-2"]),
                            ("1_b", ["model=mlp", "model.hidden=[4,4]", "optimizer.lr=0.02", "~model.weight_init"])):
        train([*overrides, "trainer.max_steps=3"], tmp_path / name)
    summary = summarize(tmp_path)
    runs = summary.runs.set_index("run_dir")
    assert summary.swept == ["model", "model.hidden", "optimizer.lr"]  # `~model.weight_init` is no value
    assert runs.loc["0_a", "model"] == "linear" and runs.loc["1_b", "model"] == "mlp"
    assert runs.loc["0_a", "optimizer.lr"] == 0.01 and runs.loc["1_b", "optimizer.lr"] == 0.02
    assert runs.loc["1_b", "model.hidden"] == "[4, 4]" and pd.isna(runs.loc["0_a", "model.hidden"])
