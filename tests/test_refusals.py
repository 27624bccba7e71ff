"""What a user types through `train.py`: a refused command leaves a finished run folder
byte-identical; an error during training is one line, exit 1, its traceback in the folder."""

import json
import re
import textwrap
from pathlib import Path

import pytest

from gradwatch.storage.paths import RunPaths

from conftest import REPO, folder_bytes, strict_json, train_py

pytestmark = pytest.mark.slow

RUN = ["model=mlp", "model.hidden=[2,2]", "dataset=line_2x", "trainer.max_steps=5", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train_py([*RUN, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    return run_dir


@pytest.mark.parametrize(("extra", "expected"), [
    (["ckpt_path=lats"], "gradwatch: ckpt_path=lats is not valid: allowed is null, `last` or an existing checkpoint "
                         "file (no file at lats)"),
    (["model.hidden=[8]", "ckpt_path=last"],
     "gradwatch: ckpt_path=last is not valid: allowed is a checkpoint of the configured model (0.weight has shape "
     "[2, 1] there, [8, 1] in the configured model; 4.bias, 4.weight not in the model)"),
])
def test_a_refused_resume_leaves_a_finished_folder_byte_identical(finished, extra, expected):
    before = folder_bytes(finished)
    result = train_py([*RUN, f"hydra.run.dir={finished}", *extra], cwd=finished.parent)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [expected], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert folder_bytes(finished) == before


def test_a_value_refused_after_hydra_started_is_put_back_too(finished):
    """Refused by the pipeline (a Trainer option only Lightning knows): Hydra's .hydra/ files are restored."""
    before = folder_bytes(finished)
    result = train_py([*RUN, f"hydra.run.dir={finished}", "trainer.precision=bogus"], cwd=finished.parent)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gradwatch: the config cannot be built: calling "
                                            "lightning.pytorch.trainer.trainer.Trainer: ValueError: Precision 'bogus'")
    assert folder_bytes(finished) == before


GROUPS = "dataset, experiment, hparams_search, loss, model, optimizer, telemetry, trainer"
KEYS = "checkpoint, ckpt_path, diagnosis, log, seed, summary, threads"


@pytest.mark.parametrize(("args", "expected"), [
    (["optimizr.lr=0.1"], f"optimizr.lr=0.1 is not valid: allowed is a key of the config (did you mean "
                          f"optimizer.lr?): the groups {GROUPS} "
                          f"or the keys {KEYS} (+optimizr.lr=... adds a new key)"),
    (["optimizer.lrr=0.1"], "optimizer.lrr=0.1 is not valid: allowed is a key of optimizer (did you mean "
                            "optimizer.lr?): _partial_, _target_, lr, momentum, weight_decay"),
    (["optimizer=adam", "optimizer.momentum=0.9"], "optimizer.momentum=0.9 is not valid: allowed is a key of "
                                                   "optimizer: _partial_, _target_, lr, weight_decay"),  # adam's
    (["-m", "optimizr.lr=0.1,0.2"], f"optimizr.lr=0.1,0.2 is not valid: allowed is a key of the config (did you "
                                    f"mean optimizer.lr?): the groups "
                                    f"{GROUPS} or the keys {KEYS} (+optimizr.lr=... adds a new key)"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is not valid: allowed is a number > 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is not valid: allowed is an integer >= 1, or -1 "
                              "(no limit: trainer.max_epochs decides)"),
    (["threads=0"], "threads=0 is not valid: allowed is an integer >= 1"),
    (["model.hidden=[4,0]"], "model.hidden[1]=0 is not valid: allowed is an integer >= 1"),  # found by building
    (["trainer.precision=bogus"], "the config cannot be built: calling lightning.pytorch.trainer.trainer.Trainer: "
                                  "ValueError: Precision 'bogus' is invalid."),  # found by Lightning
])
def test_every_refusal_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path, args, expected):
    result = train_py([*args, "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"gradwatch: {expected}"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    made = [p for p in (tmp_path / "outputs").rglob("*")] if (tmp_path / "outputs").exists() else []
    assert made == []


def test_a_new_key_with_a_plus_is_not_refused(tmp_path):
    result = train_py(["+note=first", "trainer.max_steps=2", "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (config,) = tmp_path.glob("outputs/*/*/.hydra/config.yaml")
    assert "note: first" in config.read_text()


def test_help_names_the_groups_the_common_keys_and_examples(tmp_path):
    result = train_py(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("gradwatch: train a small network")
    options = {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(", ") for line in text.splitlines()
               if ": " in line and not line.startswith((" ", "gradwatch"))}
    for group in GROUPS.split(", "):
        assert options[group] == sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")), group
    for key in ("seed=0", "threads=1", "trainer.max_steps=200", "optimizer.lr=0.1", "summary.converge_below=0.001"):
        assert f"  {key} " in text, key
    assert "  python train.py -m optimizer.lr=0.001,0.01,0.1 seed=0,1,2 " in text
    assert not (tmp_path / "outputs").exists()


@pytest.fixture
def failing_loss(tmp_path) -> dict:
    """A loss that raises on every fifth call (in each run of a sweep): an error only training finds."""
    (tmp_path / "failing_loss.py").write_text(textwrap.dedent("""
        import torch

        class FailsLater(torch.nn.MSELoss):
            calls = 0

            def forward(self, output, target):
                FailsLater.calls += 1
                if FailsLater.calls % 5 == 0:
                    raise RuntimeError("the loss broke at call 5")
                return super().forward(output, target)
    """))
    import os

    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def test_an_error_during_training_is_one_line_exit_1_and_a_log_file(tmp_path, failing_loss):
    run_dir = tmp_path / "run"
    result = train_py([*RUN, "trainer.max_steps=20", "loss._target_=failing_loss.FailsLater",
                       f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=failing_loss)
    assert result.returncode == 1, result.stderr
    paths = RunPaths(run_dir)
    ours = [line for line in result.stderr.splitlines() if line.startswith("gradwatch:")]
    assert ours == [f"gradwatch: RuntimeError: the loss broke at call 5 (traceback in {paths.error_log})"]
    assert "Traceback" not in result.stdout + result.stderr
    record = strict_json(paths.record)
    assert record["status"] == "failed" and f"gradwatch: {record['error']}" == ours[0]
    assert "the loss broke at call 5" in paths.error_log.read_text().splitlines()[-1]


def test_in_a_sweep_a_failing_run_gives_only_its_progress_line(tmp_path, failing_loss):
    result = train_py(["-m", *RUN, "trainer.max_steps=20", "loss._target_=failing_loss.FailsLater", "seed=0,1"],
                      cwd=tmp_path, env=failing_loss)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if re.match(r"\[\d/2\]", line)]
    assert len(progress) == 2 and all("failed" in line and "RuntimeError" in line for line in progress)
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("gradwatch: 2 run(s) failed")]
