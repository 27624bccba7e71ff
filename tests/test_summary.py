"""The summariser on folders of real runs, in-process."""

import os
import subprocess
import sys

import pandas as pd

from gradwatch.summary.table import configured_thresholds, summarize

from conftest import REPO, train


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
