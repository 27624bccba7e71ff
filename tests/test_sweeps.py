"""Sweeps through `train.py -m` in subprocesses, and their summaries."""

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, read_tb, strict_json, train_py

pytestmark = pytest.mark.slow


def _sweep_dir(cwd: Path) -> Path:
    (found,) = list((cwd / "outputs" / "multirun").glob("*/*"))
    return found


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("basic")
    result = train_py(["-m", "model=linear,mlp", "optimizer.lr=0.05,1e30", "seed=0,1", "trainer.max_steps=15",
                       "dataset=line_2x"], cwd=cwd)
    return result, _sweep_dir(cwd)


def test_sweep_has_one_row_per_run_and_swept_keys_as_columns(basic_sweep):
    result, sweep = basic_sweep
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 8
    assert {"run_dir", "status", "model", "optimizer.lr", "seed", "steps", "final_loss", "min_loss",
            "steps_to_converge", "converged", "diverged", "dead_fraction_final", "dead_fraction_max",
            "grad_global_norm_final", "wall_s"} <= set(table.columns)
    assert sorted(zip(table["model"], table["optimizer.lr"], table["seed"], strict=True)) == sorted(
        (m, lr, s) for m in ("linear", "mlp") for lr in (0.05, 1e30) for s in (0, 1))
    assert (sweep / "summary.md").read_text().count("\n|") >= 8 + 4  # per-run rows and grouped rows
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The sweep's own folder names carry the overrides, with safe characters only.
    for run_dir in table["run_dir"]:
        assert "/" not in run_dir and ":" not in run_dir and (sweep / run_dir / "run.json").exists()


def test_run_folders_are_named_by_what_tells_the_runs_apart(basic_sweep):
    result, sweep = basic_sweep
    # dataset=line_2x and trainer.max_steps=15 are the same in every run: left out of the names.
    expected = [f"{n:03d}_model={model},optimizer.lr={lr},seed={seed}" for n, (model, lr, seed) in enumerate(
        (m, lr, s) for m in ("linear", "mlp") for lr in ("0.05", "1e+30") for s in (0, 1))]
    assert sorted(p.name for p in sweep.iterdir() if (p / "run.json").exists()) == expected
    hydra_overrides = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["overrides"]["hydra"]
    assert "hydra.job.config.override_dirname.exclude_keys=['dataset','trainer.max_steps']" in hydra_overrides
    # Each run keeps all its overrides in its record and its .hydra folder.
    for name in expected:
        overrides = yaml.safe_load((sweep / name / ".hydra" / "overrides.yaml").read_text())
        assert strict_json(sweep / name / "run.json")["overrides"] == overrides
        assert {"dataset=line_2x", "trainer.max_steps=15"} <= set(overrides)
    lines = [line.split()[1] for line in result.stdout.splitlines() if re.match(r"\[\d+/", line)]
    assert lines == [name.split("_", 1)[1] for name in expected]


def _tb_folder(folder: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_mean_over_seeds_folder_holds_each_settings_mean_and_the_closing_line_opens_the_sweep(basic_sweep):
    result, sweep = basic_sweep
    table = pd.read_csv(sweep / "summary.csv")
    means = sweep / "mean_over_seeds"
    assert sorted(p.name for p in means.iterdir()) == sorted(
        f"model={m},lr={lr}" for m in ("linear", "mlp") for lr in ("0.05", "1e+30"))
    for (model, lr), runs in table.groupby(["model", "optimizer.lr"]):
        seeds = [read_tb(sweep / run_dir) for run_dir in runs["run_dir"]]
        mean = _tb_folder(means / f"model={model},lr={lr}")
        for tag in ("train/loss", "grad/global_norm", "grad/0.weight/norm"):
            steps = sorted({step for seed in seeds for step in seed[tag]})
            expected = {}
            for step in steps:  # float64 mean of the finite values, stored as float32
                finite = [seed[tag][step] for seed in seeds if math.isfinite(seed[tag].get(step, math.nan))]
                if finite:
                    expected[step] = sum(finite) / len(finite)
            assert mean[tag].keys() == expected.keys(), (model, lr, tag)
            assert list(mean[tag].values()) == pytest.approx(list(expected.values()), rel=1e-6)
    # 8 runs and 4 settings: TensorBoard selects all of them, so the sweep itself is the folder to open.
    tensorboard = Path(sys.executable).parent / "tensorboard"
    assert f"gradwatch: TensorBoard: {tensorboard} --logdir {sweep.relative_to(sweep.parents[3])}\n" in result.stdout


def test_final_loss_equals_last_tensorboard_loss(basic_sweep):
    _, sweep = basic_sweep
    table = pd.read_csv(sweep / "summary.csv")
    for row in table.itertuples():
        losses = read_tb(sweep / row.run_dir)["train/loss"]
        last = losses[max(losses)]
        # A non-finite loss is written nan in the CSV (docs/findings.md): the status says why.
        assert ((not math.isfinite(last) and math.isnan(row.final_loss))
                or row.final_loss == pytest.approx(last, rel=1e-7))
        assert row.steps == max(losses) + 1


def test_diverging_setting_is_marked_while_others_complete(basic_sweep):
    result, sweep = basic_sweep
    table = pd.read_csv(sweep / "summary.csv")
    diverging = table["optimizer.lr"] == 1e30
    assert (table.loc[diverging, "status"] == "diverged").all() and table.loc[diverging, "diverged"].all()
    assert (table.loc[~diverging, "status"] == "completed").all() and not table.loc[~diverging, "diverged"].any()
    assert (table.loc[~diverging, "steps"] == 15).all()
    # One progress line per run, and where the summary is.
    lines = [line for line in result.stdout.splitlines() if re.match(r"\[\d+/", line)]
    assert len(lines) == 8 and all(line.startswith(f"[{i + 1}/8] ") for i, line in enumerate(lines))
    assert f"summary of 8 runs in {sweep.relative_to(sweep.parents[3])}" in result.stdout
    # Each line carries its run's verdict, as run.json and summary.csv have it.
    for run_dir, verdict in zip(table["run_dir"], table["verdict"], strict=True):
        record = strict_json(sweep / run_dir / "run.json")
        assert record["verdict"] == verdict
        # A line names its run as its folder does (what tells it apart from the others).
        (line,) = [line for line in lines if line.split()[1] == run_dir.split("_", 1)[1]]
        assert f"  {record['status']}  {verdict}  final_loss=" in line
    assert set(table.loc[diverging, "verdict"]) == {"diverged"}
    # The files the summary wrote are the ones it names.
    named = re.search(r"summary of 8 runs in \S+/summary\.md \((.*)\)", result.stdout).group(1).split(", ")
    assert named[:1] == ["summary.csv"] and "report.png" in named and "report_gradients.png" in named
    assert all((sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in named[1:])


def test_hparams_carry_config_and_final_metrics(basic_sweep):
    _, sweep = basic_sweep
    table = pd.read_csv(sweep / "summary.csv").set_index("run_dir")
    for run_dir in table.index:
        acc = EventAccumulator(str(sweep / run_dir / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in content and "_hparams_/experiment" in content
        start = content["_hparams_/session_start_info"]
        assert b"optimizer.lr" in start and b"model" in start
        final = acc.Scalars("hparams/final_loss")[-1].value
        expected = table.loc[run_dir, "final_loss"]
        assert (math.isnan(final) and not math.isfinite(expected)) or final == pytest.approx(expected, rel=1e-6) \
            or (math.isinf(final) and math.isinf(expected))


def test_grouped_view_averages_over_seeds(basic_sweep):
    _, sweep = basic_sweep
    from gradwatch.summary.table import summarize

    summary = summarize(sweep)
    runs = summary.runs
    group = summary.grouped.set_index(["model", "optimizer.lr"])
    linear = runs[(runs["model"] == "linear") & (runs["optimizer.lr"] == 0.05)]["final_loss"]
    assert group.loc[("linear", 0.05), "runs"] == 2
    assert group.loc[("linear", 0.05), "final_loss_mean"] == pytest.approx(linear.mean())
    assert group.loc[("linear", 0.05), "final_loss_std"] == pytest.approx(linear.std())
    assert group.loc[("linear", 1e30), "diverged_mean"] == 1.0


def test_corrupt_run_folder_is_listed_not_fatal(basic_sweep, tmp_path):
    _, sweep = basic_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    runs = sorted(p for p in copy.iterdir() if p.is_dir())
    (runs[0] / "run.json").write_text("{not json")
    part = sorted((runs[1] / "metrics").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:40])  # truncated
    shutil.rmtree(runs[2] / "metrics")
    (runs[2] / "run.json").unlink()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), str(copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(copy / "summary.csv").set_index("run_dir")
    assert "run.json unreadable" in table.loc[runs[0].name, "error"]
    assert "metrics part-" in table.loc[runs[1].name, "error"]
    assert table.loc[runs[2].name, "status"] == "unreadable"
    assert "unreadable:" in result.stdout and runs[0].name in result.stdout
    assert len(table) == 8


def test_failed_run_is_recorded_and_sweep_exit_code_says_so(tmp_path):
    # A bad value gradwatch checks, and one only Lightning knows is bad: both are recorded.
    result = train_py(["-m", "model.hidden=[4],[0]", "trainer.precision=32-true,bogus", "trainer.max_steps=5"],
                      cwd=tmp_path)
    assert result.returncode == 1
    sweep = _sweep_dir(tmp_path)
    table = pd.read_csv(sweep / "summary.csv").set_index(["model.hidden", "trainer.precision"])
    assert len(table) == 4
    assert table.loc[("[4]", "32-true"), "status"] == "completed"
    assert "model.hidden[0]=0 is not valid" in table.loc[("[0]", "32-true"), "error"]
    assert "Precision 'bogus' is invalid" in table.loc[("[4]", "bogus"), "error"]
    assert (table.drop(index=("[4]", "32-true"))["status"] == "failed").all()
    assert "3 run(s) failed" in result.stderr
    assert len([line for line in result.stdout.splitlines() if re.match(r"\[\d/4\]", line)]) == 4


def test_joblib_launcher_runs_in_parallel_processes(tmp_path):
    result = train_py(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=linear,mlp",
                       "trainer.max_steps=10"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = _sweep_dir(tmp_path)
    table = pd.read_csv(sweep / "summary.csv")
    assert sorted(table["model"]) == ["linear", "mlp"] and (table["status"] == "completed").all()
    # Parallel runs end in any order; their lines come in run order.
    lines = [line for line in result.stdout.splitlines() if re.match(r"\[\d+/", line)]
    assert [line.split()[0] for line in lines] == ["[1/2]", "[2/2]"]
    assert not list(sweep.glob(".progress*"))
    for row in table.itertuples():
        losses = read_tb(sweep / row.run_dir)["train/loss"]
        assert row.final_loss == pytest.approx(losses[9], rel=1e-7)


def test_optuna_preset_finishes_trials_and_returns_a_number(tmp_path):
    result = train_py(["hparams_search=optuna", "hydra.sweeper.n_trials=3", "trainer.max_steps=10"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = _sweep_dir(tmp_path)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 3
    assert best["best_value"] == pytest.approx(table["final_loss"].min(), rel=1e-6)


def test_two_sweeps_in_the_same_second_never_share_a_folder(tmp_path):
    args = [sys.executable, str(REPO / "train.py"), "-m", "model=linear", "trainer.max_steps=3"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 2
    assert all(len(pd.read_csv(s / "summary.csv")) == 1 for s in sweeps)
    # A sweep of one run: no key varies, so its folder keeps every override.
    assert all(pd.read_csv(s / "summary.csv")["run_dir"].tolist() == ["000_model=linear,trainer.max_steps=3"]
               for s in sweeps)


def test_run_json_is_valid_for_every_run(basic_sweep):
    _, sweep = basic_sweep
    run_dirs = pd.read_csv(sweep / "summary.csv")["run_dir"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted([*run_dirs, "mean_over_seeds"])
    for run in run_dirs:
        record = strict_json(sweep / run / "run.json")
        assert record["status"] in ("completed", "diverged") and record["wall_s"] > 0
