"""What a user is told to open: run lines in order, the folder TensorBoard opens on, the newest output."""

import subprocess
import sys
from pathlib import Path

from gradwatch.storage.events import EventFile
from gradwatch.summary.aggregate import TENSORBOARD_SELECTS, logdir_to_open, newest_output
from gradwatch.summary.sweep import print_in_order

from conftest import REPO


def test_lines_of_runs_that_end_out_of_order_are_printed_in_run_order(tmp_path, capsys):
    print_in_order(tmp_path, 2, "[2/4] b")
    print_in_order(tmp_path, 4, "[4/4] d")
    assert capsys.readouterr().out == ""  # both wait for run 1
    print_in_order(tmp_path, 1, "[1/4] a")
    assert capsys.readouterr().out == "[1/4] a\n[2/4] b\n"
    print_in_order(tmp_path, None, None)  # the sweep's end: run 3 never reported
    assert capsys.readouterr().out == "[4/4] d\n"


def _runs(folder: Path, n: int) -> None:
    for i in range(n):
        EventFile(folder / f"{i}_run" / "tb").close()


def test_a_sweep_opens_whole_until_tensorboard_would_select_none(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    _runs(small, TENSORBOARD_SELECTS - 4)
    _runs(small / "mean_over_seeds", 4)
    assert logdir_to_open(small) == small  # 40 runs: all selected
    _runs(large, 48)
    _runs(large / "mean_over_seeds", 16)
    assert logdir_to_open(large) == large / "mean_over_seeds"
    one_run = tmp_path / "run"
    _runs(one_run, 1)
    assert logdir_to_open(one_run) == one_run


def test_newest_output_is_the_latest_run_or_sweep_by_date_and_time(tmp_path):
    for folder in ("2026-01-02/10-00-00", "2026-01-02/09-00-00", "multirun/2026-01-01/23-00-00"):
        (tmp_path / folder).mkdir(parents=True)
    assert newest_output(tmp_path) == tmp_path / "2026-01-02/10-00-00"
    (tmp_path / "multirun/2026-01-02/11-00-00").mkdir(parents=True)
    assert newest_output(tmp_path) == tmp_path / "multirun/2026-01-02/11-00-00"
    assert newest_output(tmp_path / "nothing") is None


def test_tensorboard_script_refuses_a_missing_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "open_tensorboard.py"), "--outputs", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        f"folder: nothing under {tmp_path} yet; allowed is a run or sweep folder (make train first)")


def test_the_closing_line_of_a_large_sweep_opens_its_means_and_names_the_sweep(tmp_path, monkeypatch):
    from gradwatch.summary.sweep import open_line

    monkeypatch.chdir(tmp_path)
    sweep = Path("outputs/multirun/2026-01-02/10-00-00-000000")
    _runs(sweep, 48)
    _runs(sweep / "mean_over_seeds", 16)
    tensorboard = Path(sys.executable).absolute().parent / "tensorboard"
    assert open_line(tmp_path / sweep) == (
        f"gradwatch: TensorBoard, the mean over seeds per setting: {tensorboard} --logdir {sweep}/mean_over_seeds"
        f" (every run: --logdir {sweep})")
