"""Same seed and config, same numbers: whatever OMP_NUM_THREADS the shell has, and whether a run is
one of a joblib sweep or runs alone. Through train.py, read back from TensorBoard's files."""

import json

import pytest
import torch

from gradwatch.storage.paths import RunPaths

from conftest import read_tb, strict_json, train_py

pytestmark = pytest.mark.slow  # each test starts train.py

# The setting that ended `dead_layer` (loss 2.302) with one OpenMP thread and `dying_relu` (0.419)
# with two, when a run took the shell's threads.
DIGITS_DEEP_RELU = ["experiment=study_digits_depth", "hydra.mode=RUN", "model.hidden=[32,32,32,32,32,32]",
                    "model.activation=relu", "model.weight_init=kaiming_normal", "seed=0",
                    "trainer.enable_progress_bar=false"]


def numbers(run_dir) -> dict[str, dict[int, float]]:
    """The loss and every gradient norm, step by step (EventAccumulator, no sampling)."""
    return {tag: values for tag, values in read_tb(run_dir).items()
            if tag == "train/loss" or tag.endswith("/norm")}


def test_the_same_digits_run_gives_identical_numbers_with_1_and_2_omp_threads(tmp_path):
    runs = {}
    for threads in ("1", "2"):
        run_dir = tmp_path / f"omp{threads}"
        result = train_py([*DIGITS_DEEP_RELU, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                          env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        assert result.returncode == 0, result.stderr
        runs[threads] = (numbers(run_dir), strict_json(RunPaths(run_dir).record))
    (one, record_one), (two, record_two) = runs["1"], runs["2"]
    assert len(one["train/loss"]) == 200 and one.keys() == two.keys()
    assert one == two  # every step of every curve, bit for bit
    assert record_one["verdict"] == record_two["verdict"] and record_one["final_loss"] == record_two["final_loss"]
    for record in (record_one, record_two):
        environment = record["environment"]
        assert environment["threads"] == 1 and environment["torch"] == torch.__version__
        assert (environment["device"], environment["precision"], environment["processes"]) == ("cpu", "32-true", 1)
        assert environment["deterministic_algorithms"] is True


def test_the_threads_key_sets_the_runs_threads(tmp_path):
    run_dir = tmp_path / "run"
    result = train_py(["threads=2", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                       f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert strict_json(RunPaths(run_dir).record)["environment"]["threads"] == 2


def test_a_run_of_a_joblib_sweep_reruns_alone_to_the_same_numbers(tmp_path):
    common = ["dataset=digits", "loss=cross_entropy", "model.hidden=[32,32,32]", "optimizer.lr=0.1",
              "optimizer.momentum=0.9", "trainer.max_steps=40", "trainer.enable_progress_bar=false"]
    sweep_dir = tmp_path / "sweep"
    result = train_py(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
                       *common, "seed=0,1,2"], cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    # Run folders zero-padded, so that they sort in run order.
    folders = sorted(p.name for p in sweep_dir.iterdir() if RunPaths(p).is_run())
    assert [name[:4] for name in folders] == ["000_", "001_", "002_"]
    assert json.loads((sweep_dir / folders[1] / "run.json").read_text())["seed"] == 1

    alone = tmp_path / "alone"
    result = train_py([*common, "seed=1", f"hydra.run.dir={alone}"], cwd=tmp_path)  # the shell's threads
    assert result.returncode == 0, result.stderr
    swept, single = numbers(sweep_dir / folders[1]), numbers(alone)
    assert len(single["train/loss"]) == 40 and swept == single
    swept_record = strict_json(RunPaths(sweep_dir / folders[1]).record)
    single_record = strict_json(RunPaths(alone).record)
    assert swept_record["final_loss"] == single_record["final_loss"]
    # Both took their threads from the config, not from the launcher or the shell.
    assert swept_record["environment"]["threads"] == single_record["environment"]["threads"] == 1
