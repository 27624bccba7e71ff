"""An interrupted sweep: its runs' folders stay, the sweep's progress state goes, and
`scripts/summarize.py` summarises what ran."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from gradwatch.summary import sweep as sweep_module

from conftest import REPO, read_tb, strict_json

# Run 0 ends after 20 steps; run 1 would train for hours, so the signal always finds it training.
SWEEP = ["-m", "model=mlp", "dataset=line_2x", "trainer.max_steps=20,1000000", "log.flush_every_n_steps=10",
         "trainer.enable_progress_bar=false"]
RUNS = ["000_trainer.max_steps=20", "001_trainer.max_steps=1000000"]


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored; Ctrl-C must arrive.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted_sweep(cwd: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path, bool]:
    """The sweep, signalled once run 1 has logged steps (run 0 has ended and printed its line);
    the result, the sweep folder, and whether the progress state was there just before the signal."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *SWEEP], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 180
    while not list(cwd.glob(f"outputs/multirun/*/*/{RUNS[1]}/metrics/part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    (sweep,) = cwd.glob("outputs/multirun/*/*")
    progress_before = (sweep / ".progress.json").exists() and (sweep / ".progress.lock").exists()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), sweep, progress_before


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_sweep_leaves_its_runs_and_summarizes_later(tmp_path, sig, code):
    result, sweep, progress_before = _interrupted_sweep(tmp_path, sig)
    assert result.returncode == code, result.stderr
    assert progress_before  # the state the sweep kept while it ran
    # Exactly what ran: Hydra's record of the sweep and the two runs' folders, nothing else.
    assert sorted(p.name for p in sweep.iterdir()) == sorted(["multirun.yaml", *RUNS])
    records = [strict_json(sweep / run / "run.json") for run in RUNS]
    assert [r["status"] for r in records] == ["completed", "interrupted"]
    losses = [read_tb(sweep / run)["train/loss"] for run in RUNS]
    assert sorted(losses[0]) == list(range(20)) and records[0]["steps"] == 20
    assert 0 < records[1]["steps"] < 1000000
    shown = sweep.relative_to(tmp_path)
    lines = result.stdout.splitlines()
    assert lines[0] == f"gradwatch: sweep of 2 runs into {shown}"
    assert lines[1].startswith("[1/2] trainer.max_steps=20  completed  ")
    assert lines[2].startswith("[2/2] trainer.max_steps=1000000  interrupted  ")
    assert lines[3:] == [f"gradwatch: sweep interrupted before its summary; its runs so far are in {shown} "
                         f"(to summarise them: python scripts/summarize.py {shown})"]

    summarized = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), str(sweep)],
                                capture_output=True, text=True, timeout=180)
    assert summarized.returncode == 0, summarized.stderr
    table = pd.read_csv(sweep / "summary.csv")
    assert table["run_dir"].tolist() == RUNS
    assert table["status"].tolist() == ["completed", "interrupted"]
    assert table["trainer.max_steps"].tolist() == [20, 1000000]
    for row, run_losses, record in zip(table.itertuples(), losses, records, strict=True):
        # The summary's steps and final loss are the run's, as TensorBoard has them.
        assert row.steps == record["steps"] == max(run_losses) + 1
        assert row.final_loss == pytest.approx(run_losses[max(run_losses)], rel=1e-7)
    assert not list(sweep.glob(".progress*"))


def test_the_end_of_an_interrupted_sweep_prints_waiting_lines_and_removes_its_state(tmp_path, capsys):
    sweep_module.print_in_order(tmp_path, 2, "[2/3] b")  # waits for run 1, which never reports
    previous = signal.getsignal(signal.SIGTERM)
    interruption = sweep_module._Interruption(tmp_path)
    try:
        # Between runs, a SIGTERM ends the sweep as a shell reports it, through the exit's tidying.
        with pytest.raises(SystemExit) as stopped:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stopped.value.code == 143
        interruption.at_exit()
    finally:
        interruption.close()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert capsys.readouterr().out == (
        f"[2/3] b\ngradwatch: sweep interrupted before its summary; its runs so far are in {tmp_path} "
        f"(to summarise them: python scripts/summarize.py {tmp_path})\n")
    assert list(tmp_path.iterdir()) == []


def test_a_cut_short_progress_state_is_removed_without_an_error(tmp_path, capsys):
    (tmp_path / ".progress.json").write_text('{"next": 2, "wai')
    (tmp_path / ".progress.lock").write_text("")
    sweep_module._end_progress(tmp_path)
    assert capsys.readouterr().out == "" and list(tmp_path.iterdir()) == []
