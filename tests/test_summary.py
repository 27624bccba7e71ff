"""The summariser on folders of real runs, in-process."""

import csv
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from gradwatch.summary.findings import Thresholds, diagnose_run
from gradwatch.summary.table import readable_grouped, summarize, write_summary

from conftest import REPO, read_tb, strict_json, train


@pytest.mark.slow  # starts scripts/summarize.py
def test_summarize_uses_each_runs_own_convergence_threshold(tmp_path):
    for name, below in (("0_a", 0.99), ("1_b", 1e-9)):
        train([f"summary.converge_below={below}", "trainer.max_steps=20"], tmp_path / name)
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


# The default exploding factor (100) flags the lr 0.2 run (tests/test_findings.py); these runs say 1e30.
LINE = ["model=linear", "dataset=line_2x", "trainer.max_steps=200", "diagnosis.exploding_factor=1e30"]


@pytest.fixture(scope="module")
def fates(tmp_path_factory):
    """Three linear runs on y = 2x: lr 0.05 (seeds 0 and 1) converge, lr 0.2 diverges."""
    folder = tmp_path_factory.mktemp("fates")
    for name, extra in (("0_a", ["optimizer.lr=0.05", "seed=0"]), ("1_b", ["optimizer.lr=0.05", "seed=1"]),
                        ("2_c", ["optimizer.lr=0.2", "seed=0"])):
        train([*LINE, *extra], folder / name)
    return folder


def test_grouped_view_counts_verdicts_and_summary_md_says_what_happened(fates):
    summary = write_summary(fates)
    runs = summary.runs.set_index("run_dir")
    assert runs["verdict"].to_dict() == {"0_a": "converged", "1_b": "converged", "2_c": "diverged"}
    assert runs["verdict"].to_dict() == {rd: strict_json(fates / rd / "run.json")["verdict"] for rd in runs.index}
    # Each run's own diagnosis.* thresholds: the exploding factor of 1e30 was never reached.
    assert runs["findings"].to_dict() == {"0_a": "converged", "1_b": "converged", "2_c": "diverged"}
    assert summary.swept == ["optimizer.lr"]
    grouped = summary.grouped.set_index("optimizer.lr")
    assert grouped.loc[0.05, ["verdict_diverged", "verdict_converged"]].tolist() == [0, 2]
    assert grouped.loc[0.2, ["verdict_diverged", "verdict_converged"]].tolist() == [1, 0]
    assert readable_grouped(summary).set_index("optimizer.lr")["verdicts"].to_dict() == {
        0.05: "converged 2", 0.2: "diverged 1"}
    text = (fates / "summary.md").read_text()
    happened = text.split("## What happened\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert happened == ["- **Runs diverged** in 1 of 2 settings (1 of 3 runs): optimizer.lr=0.2 (1/1).",
                        "- Nowhere: ReLUs died, gradients vanished, gradients exploded, the loss stalled."]


def per_run_table(text: str) -> list[list[str]]:
    """The cells of summary.md's per-run table (header first, the separator row left out)."""
    section = text.split("## Per run\n\n", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for i, row in enumerate(rows) if i != 1]


def test_a_nonfinite_or_missing_number_is_nan_in_csv_and_markdown_null_in_run_json_nan_in_hparams(fates):
    write_summary(fates)
    record = strict_json(fates / "2_c" / "run.json")
    assert record["status"] == "diverged" and record["final_loss"] is None
    assert math.isnan(read_tb(fates / "2_c")["hparams/final_loss"][record["steps"]])
    with open(fates / "summary.csv", newline="") as handle:
        rows = {row["run_dir"]: row for row in csv.DictReader(handle)}
    assert rows["2_c"]["final_loss"] == "nan" and rows["0_a"]["steps_to_converge"] != "nan"
    assert rows["0_a"]["dead_fraction_final"] == "nan"  # a linear model has no ReLU
    text = (fates / "summary.md").read_text()
    assert "inf" not in text and "| -" not in text
    header, *cells = per_run_table(text)
    # Narrow: the run's number, the swept key, the seed and what people compare (a linear model has no
    # dead fraction, a regression no accuracy); status because one run did not complete.
    assert header == ["run", "optimizer.lr", "seed", "status", "verdict", "final_loss", "steps_to_converge"]
    table = {row[0]: dict(zip(header, row, strict=True)) for row in cells}
    assert set(table) == {"0", "1", "2"}
    assert (table["2"]["status"], table["2"]["verdict"], table["2"]["final_loss"]) == ("diverged", "diverged", "nan")
    first = min(step for step, loss in read_tb(fates / "0_a")["train/loss"].items() if loss <= 1e-3)
    assert int(table["0"]["steps_to_converge"]) == first


def test_an_explicit_convergence_threshold_applies_to_the_findings_too(fates):
    for below, relative in ((0.5, True), (1e-2, False), (0.0, True)):
        runs = summarize(fates, converge_below=below, relative=relative).runs.set_index("run_dir")
        for run_dir in ("0_a", "1_b"):
            found = {f.code: f for f in diagnose_run(fates / run_dir, Thresholds(
                converge_below=below, converge_relative=relative, exploding_factor=1e30))}
            assert runs.loc[run_dir, "converged"] == ("converged" in found) == (
                runs.loc[run_dir, "verdict"] == "converged")
            if "converged" in found:
                assert runs.loc[run_dir, "steps_to_converge"] == found["converged"].step


def test_write_summary_writes_every_report_figure_for_a_folder_and_for_one_run(fates):
    summary = write_summary(fates)
    assert summary.written == ["summary.csv", "summary.md", "report.png", "report_heatmap.png"]
    one = write_summary(fates / "0_a")
    assert one.written == summary.written and len(one.runs) == 1 and one.runs.loc[0, "verdict"] == "converged"
    for name in one.written[2:]:
        assert (fates / "0_a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
