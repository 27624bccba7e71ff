"""What a user sees of one run: no Lightning banners, and a last line with the verdict and the
command that opens the run in TensorBoard."""

import re
import shlex

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.storage.paths import RunPaths
from gradwatch.summary.findings import diagnose_run, verdict

from conftest import strict_json, train_py


@pytest.mark.slow  # starts train.py
def test_a_run_ends_with_its_verdict_and_the_tensorboard_command(tmp_path):
    result = train_py(["model=mlp", "model.bias_init=-5.0", "trainer.max_steps=40"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    console = result.stdout + result.stderr
    for banner in ("GPU available", "TPU available", "litlogger", "Tip:", "`Trainer.fit` stopped"):
        assert banner not in console
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"gradwatch: (\w+) after (\d+) steps \((.*)\), final loss (\S+); "
                         r"tensorboard --logdir (.+)", last)
    assert match, last
    name, steps, evidence, loss, folder = match.groups()
    run_dir = tmp_path / shlex.split(folder)[0]
    assert folder.startswith("outputs/") and RunPaths(run_dir).is_run()
    record = strict_json(run_dir / "run.json")
    assert name == record["verdict"] == verdict(diagnose_run(run_dir)) == "dead_layer"
    assert int(steps) == record["steps"] == 40 and float(loss) == pytest.approx(record["final_loss"], rel=1e-3)
    assert evidence == record["findings"][0]["detail"] == "layer 1: 16 of 16 units dead from step 0 (1 at step 0)"
    # TensorBoard's text plugin carries the same findings.
    acc = EventAccumulator(str(RunPaths(run_dir).tb), size_guidance={"tensors": 0})
    acc.Reload()
    assert acc.SummaryMetadata("findings").plugin_data.plugin_name == "text"
    (event,) = acc.Tensors("findings")
    text = event.tensor_proto.string_val[0].decode()
    assert text.splitlines()[0] == "**verdict: dead_layer**"
    assert [line for line in text.splitlines() if line.startswith("- ")] == [
        f"- `{f['code']}` at step {f['step']} ({f['where']}): {f['detail']}" for f in record["findings"]]
