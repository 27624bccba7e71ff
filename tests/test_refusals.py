"""What a user types through `train.py`: a refused command leaves a finished run folder
byte-identical; an error during training is one line, exit 1, its traceback in the folder."""

import json
import re
import textwrap
from pathlib import Path

import pytest

from gradwatch.storage.paths import RunPaths

from conftest import folder_bytes, strict_json, train_py

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
    """Refused by the pipeline (not by the pre-check): Hydra's .hydra/ files are restored."""
    before = folder_bytes(finished)
    result = train_py([*RUN, f"hydra.run.dir={finished}", "optimizer.lr=-1"], cwd=finished.parent)
    assert result.returncode == 2
    assert result.stderr.strip() == "gradwatch: optimizer.lr=-1 is not valid: allowed is a number > 0"
    assert folder_bytes(finished) == before


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
