"""The run's records, in-process: one outcome everywhere, one TensorBoard writer, strict run.json,
refusals that leave a run folder as it was, failures recorded with their traceback in the folder."""

import errno
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gradwatch.api import train as api_train
from gradwatch.config.errors import ConfigError
from gradwatch.config.overrides import override_values
from gradwatch.storage import parquet
from gradwatch.storage.parquet import Scalars, read_metrics
from gradwatch.storage.paths import RunPaths
from gradwatch.storage.record import read_run
from gradwatch.summary.outcome import Outcome, outcome_of
from gradwatch.summary.table import summarize
from gradwatch.telemetry import tags
from gradwatch.telemetry.recorder import StepRecorder
from gradwatch.training.module import GradwatchModule
from gradwatch.training.pipeline import RunFailed

from conftest import CONF, QUIET, folder_bytes, read_tb, strict_json, train


def _scalars(rows: list[tuple[int, str, float]]) -> Scalars:
    names = sorted({tag for _, tag, _ in rows})
    return Scalars(step=np.array([s for s, _, _ in rows], dtype=np.int64),
                   code=np.array([names.index(t) for _, t, _ in rows], dtype=np.int64),
                   value=np.array([v for _, _, v in rows], dtype=np.float64), names=names, unreadable=[])


def test_outcome_from_hand_built_scalars():
    rows = [(s, tags.LOSS, v) for s, v in enumerate([4.0, 0.5, 0.25, 0.3])]
    rows += [(s, tags.ACCURACY, v) for s, v in enumerate([0.1, 0.5, 0.75, 1.0])]
    rows += [(0, "act/1/dead_fraction", 0.25), (0, "act/3/dead_fraction", 0.75),
             (3, "act/1/dead_fraction", 0.5), (3, "act/3/dead_fraction", 0.0), (3, tags.GLOBAL_NORM, 2.5),
             (3, "grad/0.weight/nonfinite", 0.0)]
    outcome = outcome_of(_scalars(rows), converge_below=0.5)
    # The end is the last 3 logged steps: loss median 0.3, accuracy mean 0.75.
    assert outcome == Outcome(steps=4, final_loss=0.3, min_loss=0.25, steps_to_converge=1, converged=True,
                              diverged=False, dead_fraction_final=0.25, dead_fraction_max=0.5,
                              grad_global_norm_final=2.5, accuracy_final=0.75,
                              layers={"dead_fraction_final/1": 0.5, "dead_fraction_max/1": 0.5,
                                      "dead_fraction_final/3": 0.0, "dead_fraction_max/3": 0.75})
    assert outcome_of(_scalars(rows), converge_below=0.1, relative=True).steps_to_converge == 2  # 0.1 x 4
    # Below 0.28 at step 2 only: the end (0.3) is above it, so not converged, though it got there once.
    touched = outcome_of(_scalars(rows), converge_below=0.28)
    assert (touched.steps_to_converge, touched.converged) == (2, False)
    assert Outcome.hparam_names() == ["final_loss", "min_loss", "steps_to_converge", "dead_fraction_final",
                                      "accuracy_final"]
    assert outcome.record()["dead_fraction_layers"] == {"1": 0.5, "3": 0.0}


def test_outcome_of_a_diverged_curve_is_strict_in_run_json_and_nan_in_the_table():
    rows = [(0, tags.LOSS, 1.0), (1, tags.LOSS, math.inf), (1, "grad/0.weight/nonfinite", 2.0)]
    outcome = outcome_of(_scalars(rows), converge_below=1e-3)
    assert outcome.diverged and not outcome.converged and outcome.min_loss == 1.0
    assert outcome.record()["final_loss"] is None and outcome.record()["dead_fraction_final"] is None
    assert math.isinf(outcome.row()["final_loss"]) and math.isnan(outcome.row()["grad_global_norm_final"])
    assert math.isnan(outcome.hparams_metrics()["final_loss"])  # NaN in HParams, never Infinity
    assert outcome.value == math.inf
    json.dumps(outcome.record(), allow_nan=False)


def test_override_values_use_hydra_parser_choices_and_the_resolved_config(base_cfg):
    items = ["model=linear", "optimizer.lr=1e-2", "model.hidden=[4,4]", "~seed", "+extra=abc", "hydra.run.dir=x"]
    values = override_values(items, base_cfg, {"model": "linear"})
    assert values == {"model": "linear", "optimizer.lr": 0.01, "model.hidden": "[16, 16]", "extra": "abc"}
    assert override_values(["model.hidden=[4,4]"]) == {"model.hidden": "[4, 4]"}  # no config: as typed


def test_snapshot_restores_a_folder_byte_for_byte(tmp_path):
    paths = RunPaths(tmp_path / "run")
    paths.hydra.mkdir(parents=True)
    paths.config.write_text("a: 1\n")
    paths.record.write_text('{"status": "completed"}\n')
    before = folder_bytes(paths.root)
    snapshot = paths.snapshot()
    paths.config.write_text("a: 2\n")
    paths.record.write_text("{}")
    (paths.hydra / "hydra.yaml").write_text("new")
    snapshot.restore()
    assert folder_bytes(paths.root) == before


def test_one_event_file_no_lightning_logger_files_and_hparams_hold_choices(run_dir):
    train(["model=mlp", "model.hidden=[4]", "dataset=line_2x", "optimizer.lr=0.05", "trainer.max_steps=6"], run_dir)
    paths = RunPaths(run_dir)
    assert [p.name.endswith(".steps") for p in paths.tb.iterdir()] == [True]  # one event file, nothing else
    acc = EventAccumulator(str(paths.tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert start["model"].string_value == "mlp" and start["dataset"].string_value == "line_2x"
    assert start["optimizer.lr"].number_value == 0.05 and start["model.hidden"].string_value == "[4]"
    record = read_run(run_dir)
    for name in Outcome.hparam_names():
        value = acc.Scalars(f"hparams/{name}")[-1].value
        assert value == pytest.approx(record[name], rel=1e-6) if record[name] is not None else math.isnan(value)


def test_run_json_summary_and_hparams_agree_for_a_run_started_from_another_runs_checkpoint(tmp_path):
    common = ["model=linear", "dataset=line_2x", "optimizer.lr=0.02", "summary.converge_below=0.5"]
    train([*common, "trainer.max_steps=30"], tmp_path / "first")
    ckpt = RunPaths(tmp_path / "first").last_ckpt
    train([*common, "trainer.max_steps=60", f"ckpt_path={ckpt}"], tmp_path / "second")
    record = read_run(tmp_path / "second")
    row = summarize(tmp_path).runs.set_index("run_dir").loc["second"]
    losses = read_tb(tmp_path / "second")["train/loss"]
    assert sorted(losses) == list(range(30, 60))  # this folder's steps
    for key in ("steps", "final_loss", "min_loss", "steps_to_converge", "grad_global_norm_final"):
        expected = record[key]
        assert (pd.isna(row[key]) and expected is None) or row[key] == expected, key
    assert record["steps"] == 60 and record["steps_to_converge"] in (None, *range(30, 60))


def test_resuming_a_completed_run_keeps_its_results(run_dir):
    common = ["trainer.max_steps=8", "model.hidden=[4]"]
    train(common, run_dir)
    before = read_run(run_dir)
    train([*common, "ckpt_path=last"], run_dir)
    after = read_run(run_dir)
    for key in ("status", "steps", "final_loss", "min_loss", "dead_fraction_final", "grad_global_norm_final"):
        assert after[key] == before[key], key
    assert before["dead_fraction_final"] is not None and before["grad_global_norm_final"] is not None
    assert after["wall_s"] >= before["wall_s"] > 0


def test_api_train_raises_config_error_and_a_refusal_leaves_a_finished_folder_as_it_was(run_dir):
    train(["trainer.max_steps=3", "model.hidden=[2,2]"], run_dir)
    before = folder_bytes(run_dir)
    with pytest.raises(ConfigError, match=r"^optimizer.lr=-1 is not valid"):
        api_train([*QUIET, "optimizer.lr=-1"], run_dir, CONF)
    with pytest.raises(ConfigError, match=r"ckpt_path=last is not valid: allowed is a checkpoint of the configured "
                                          r"model \(0.weight has shape \[2, 2\] there, \[8, 2\]"):
        api_train([*QUIET, "model.hidden=[8]", "ckpt_path=last"], run_dir, CONF)
    assert folder_bytes(run_dir) == before


class _Exploding(GradwatchModule):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            raise RuntimeError("boom at step 3")
        return super().training_step(batch, batch_idx)


def test_an_error_during_training_is_one_line_with_its_traceback_in_the_folder(run_dir, monkeypatch):
    import gradwatch.training.pipeline as pipeline

    monkeypatch.setattr(pipeline, "GradwatchModule", _Exploding)
    with pytest.raises(RunFailed) as failed:
        api_train([*QUIET, "trainer.max_steps=10"], run_dir, CONF)
    paths = RunPaths(run_dir)
    line = str(failed.value)
    assert failed.value.exit_code == 1 and "\n" not in line
    assert line == f"RuntimeError: boom at step 3 (traceback in {paths.error_log})"
    record = strict_json(paths.record)
    assert record["status"] == "failed" and record["error"] == line and record["steps"] == 3
    log = paths.error_log.read_text()
    assert log.startswith("Traceback") and "boom at step 3" in log


def test_a_full_disk_fails_the_run_with_one_line_and_keeps_every_written_file_whole(run_dir, monkeypatch):
    common = ["trainer.max_steps=10", "log.flush_every_n_steps=5", "checkpoint.every_n_steps=5"]
    train(common, run_dir)
    flushed = read_metrics(run_dir)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(parquet, "write_atomic", full)
    with pytest.raises(RunFailed) as failed:
        api_train([*QUIET, *common[1:], "trainer.max_steps=20", "ckpt_path=last"], run_dir, CONF)
    assert failed.value.exit_code == 1 and "No space left on device" in str(failed.value)
    record = strict_json(RunPaths(run_dir).record)
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    kept = read_metrics(run_dir)
    assert kept.attrs["unreadable"] == [] and kept.equals(flushed)  # nothing half-written, nothing lost


def test_recorder_works_alone_with_direct_hook_calls_and_writes_step_metrics(tmp_path):
    recorder = StepRecorder(tmp_path / "tb")
    weight = torch.nn.Parameter(torch.zeros(1))
    trainer = SimpleNamespace(global_step=0, optimizers=[torch.optim.SGD([weight], lr=0.25)], should_stop=False)
    module = SimpleNamespace(step_metrics={"train/accuracy": torch.tensor(0.75)})
    recorder.on_fit_start(trainer, module)
    for step, loss in enumerate([2.0, 1.0]):
        trainer.global_step = step
        recorder.on_before_backward(trainer, module, torch.tensor(loss))
        recorder.add(("grad/global_norm",), np.array([step + 0.5]))
        trainer.global_step = step + 1
        recorder.on_train_batch_end(trainer, module, None, None, step)
    recorder.add_text("notes", "hello", step=0)
    recorder.close()
    assert read_tb(tmp_path) == {"train/loss": {0: 2.0, 1: 1.0}, "lr": {0: 0.25, 1: 0.25},
                                 "train/accuracy": {0: 0.75, 1: 0.75}, "grad/global_norm": {0: 0.5, 1: 1.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["tb"]  # no metrics folder without metrics_dir
    assert recorder.losses == [(0, 2.0), (1, 1.0)] and recorder.last["grad/global_norm"] == 1.5


def test_summary_lists_a_non_object_run_json_and_a_truncated_part_as_unreadable(tmp_path):
    for name in ("0_a", "1_b"):
        train(["trainer.max_steps=4", "log.flush_every_n_steps=2"], tmp_path / name)
    (tmp_path / "0_a" / "run.json").write_text("[1, 2]")
    part = sorted((tmp_path / "1_b" / "metrics").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:40])
    summary = summarize(tmp_path)
    assert summary.unreadable == ["0_a", "1_b"]
    runs = summary.runs.set_index("run_dir")
    assert "run.json unreadable" in runs.loc["0_a", "error"] and runs.loc["0_a", "steps"] == 4
    assert "metrics part-000000.parquet" in runs.loc["1_b", "error"]
