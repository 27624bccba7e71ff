"""The mean over seeds per setting, read back from its event files with TensorBoard's own reader."""

import math

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gradwatch.summary.aggregate import write_mean_over_seeds
from gradwatch.summary.findings import Curves
from gradwatch.summary.table import Summary


def _curves(values: dict[str, list[float]]) -> Curves:
    rows = [(step, tag, v) for tag, series in values.items() for step, v in enumerate(series)]
    return Curves(pd.DataFrame(rows, columns=["step", "tag", "value"]))


@pytest.fixture
def summary() -> Summary:
    """lr 0.1 and 1.0, two seeds each; lr 1.0 seed 1 goes non-finite at step 2."""
    runs, metrics = [], {}
    for lr in (0.1, 1.0):
        for seed in (0, 1):
            rd = f"{lr}-{seed}"
            loss = [4.0, 2.0 + seed, 1.0 / (1 + seed), 0.5] if not (lr == 1.0 and seed == 1) else [4.0, 3.0, math.inf,
                                                                                                   math.nan]
            metrics[rd] = _curves({"train/loss": loss, "grad/0.weight/norm": [1.0 + seed, 2.0, 3.0, 4.0 * lr],
                                   "act/1/dead_fraction": [0.0, 0.25 * seed, 0.5, 1.0],
                                   "grad/0.weight/nonfinite": [0, 0, 0, 0]})
            runs.append({"run_dir": rd, "optimizer.lr": lr, "seed": seed, "final_loss": loss[-1],
                         "converged": loss[-1] <= 0.5, "diverged": not math.isfinite(loss[-1])})
    return Summary(pd.DataFrame(runs), pd.DataFrame(), ["optimizer.lr"], pd.DataFrame(), metrics=metrics)


def _read(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_each_setting_holds_the_mean_of_its_seeds_finite_values(tmp_path, summary):
    target = write_mean_over_seeds(tmp_path, summary)
    assert sorted(p.name for p in target.iterdir()) == ["lr=0.1", "lr=1.0"]
    for lr in (0.1, 1.0):
        acc = _read(target / f"lr={lr}")
        assert sorted(acc.Tags()["scalars"]) == sorted(["train/loss", "grad/0.weight/norm", "act/1/dead_fraction",
                                                        "hparams/final_loss", "hparams/converged",
                                                        "hparams/diverged"])  # no nonfinite counts
        for tag in ("train/loss", "grad/0.weight/norm", "act/1/dead_fraction"):
            seeds = np.array([summary.metrics[f"{lr}-{s}"].get(tag)[1] for s in (0, 1)], dtype=np.float64)
            finite = np.where(np.isfinite(seeds), seeds, np.nan)
            expected = np.nanmean(finite, axis=0)
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            assert [s for s, _ in got] == [0, 1, 2, 3]
            assert [v for _, v in got] == pytest.approx(expected.tolist(), rel=1e-6), (lr, tag)
    # lr 1.0 after the divergence: seed 0 alone.
    loss = [e.value for e in _read(target / "lr=1.0").Scalars("train/loss")]
    assert loss == pytest.approx([4.0, 2.5, 1.0, 0.5])


def test_each_setting_is_an_hparams_row_of_its_values_and_mean_results(tmp_path, summary):
    target = write_mean_over_seeds(tmp_path, summary)
    acc = _read(target / "lr=1.0")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.lr"].number_value == 1.0 and start.hparams["runs"].number_value == 2
    final = {tag: acc.Scalars(tag)[-1].value for tag in ("hparams/final_loss", "hparams/converged",
                                                         "hparams/diverged")}
    assert final == {"hparams/final_loss": 0.5, "hparams/converged": 0.5, "hparams/diverged": 0.5}


def test_no_folder_when_no_setting_has_two_runs(tmp_path, summary):
    one_each = Summary(summary.runs.iloc[[0, 2]].reset_index(drop=True), pd.DataFrame(), ["optimizer.lr"],
                       pd.DataFrame(), metrics=summary.metrics)
    assert write_mean_over_seeds(tmp_path, one_each) is None and not (tmp_path / "mean_over_seeds").exists()
