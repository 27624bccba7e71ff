"""What a user sees of one run through `train.py`: no Lightning banners, then a line that says what
happened (the verdict, its evidence, the other findings), the final loss, the accuracy and the dead ReLU
units where there are any, and last, on its own line, the full command that opens the run in TensorBoard."""

import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.storage.paths import RunPaths
from gradwatch.summary.findings import diagnose_run, verdict

from conftest import REPO, read_tb, strict_json, train_py

pytestmark = pytest.mark.slow  # each test starts train.py

LINE = re.compile(r"gradwatch: (\w+) after (\d+) steps?: (.+?)\.(?: Also found: (.+?)\.)? Final loss (\S+?)"
                  r"(?:, accuracy ([\d.]+)%)?(?:, (\d+)% of ReLU units dead(?:, worst layer (\w+) at (\d+)%)?)?\.")
OPEN = re.compile(r"TensorBoard: (\S+) --logdir (\S+)")


def last_line(result) -> dict:
    assert result.returncode == 0, result.stderr
    console = result.stdout + result.stderr
    for banner in ("GPU available", "TPU available", "litlogger", "Tip:", "`Trainer.fit` stopped"):
        assert banner not in console
    *_, said, last = result.stdout.strip().splitlines()
    match, opens = LINE.fullmatch(said), OPEN.fullmatch(last)
    assert match and opens, (said, last)
    keys = ("verdict", "steps", "evidence", "also", "loss", "accuracy", "dead", "worst", "worst_dead", "program",
            "folder")
    return {**dict(zip(keys, match.groups() + opens.groups(), strict=True)), "line": said}


def end_mean(values: dict[int, float]) -> float:
    """The mean over the end of the run as the findings define it: the last tenth, at least 3 steps."""
    ordered = [values[s] for s in sorted(values)]
    n = min(len(ordered), max(3, -(-len(ordered) // 10)))
    return float(np.mean(ordered[-n:]))


def test_the_default_run_says_it_is_learning_with_its_dead_units_and_the_venvs_tensorboard(tmp_path):
    """`make train` (the default config): not `none`, and the 28% dead units are named."""
    line = last_line(train_py([], cwd=tmp_path))
    run_dir = tmp_path / shlex.split(line["folder"])[0]
    record = strict_json(RunPaths(run_dir).record)
    assert line["folder"].startswith("outputs/") and RunPaths(run_dir).is_run()
    assert line["program"] == str(Path(sys.executable).absolute().parent / "tensorboard")
    assert line["verdict"] == record["verdict"] == verdict(diagnose_run(run_dir)) == "learning"
    assert line["evidence"] == record["findings"][0]["detail"] and line["also"] is None
    scalars = read_tb(run_dir)
    losses = scalars["train/loss"]
    assert int(line["steps"]) == record["steps"] == len(losses) == 200
    assert float(line["loss"]) == pytest.approx(losses[199], rel=1e-3) and not record["converged"]
    # Dead units from the TensorBoard files: the mean over the ReLU layers at the last step, the worst layer.
    dead = {tag.split("/")[1]: values[199] for tag, values in scalars.items() if tag.endswith("/dead_fraction")}
    assert set(dead) == {"1", "3"} and record["dead_fraction_layers"] == pytest.approx(dead)
    assert int(line["dead"]) == round(100 * np.mean(list(dead.values())))
    worst = max(dead, key=dead.get)
    assert (line["worst"], int(line["worst_dead"])) == (worst, round(100 * dead[worst]))
    assert line["accuracy"] is None and record["accuracy_final"] is None  # MSE regression: no accuracy
    # The whole line, its numbers from the TensorBoard files: the end is the median of the last 20 losses.
    end = float(np.median([losses[s] for s in range(180, 200)]))
    assert line["line"] == (
        f"gradwatch: learning after 200 steps: loss fell {1 - end / losses[0]:.1%} from {losses[0]:.3g} at step 0 "
        f"to {end:.3g} (median of the last 20 logged steps); not yet at or below 0.001. "
        f"Final loss {losses[199]:.4g}, {np.mean(list(dead.values())):.0%} of ReLU units dead, "
        f"worst layer {worst} at {dead[worst]:.0%}.")


def test_a_digits_run_carries_its_accuracy_in_the_line_and_run_json(tmp_path):
    result = train_py(["dataset=digits", "loss=cross_entropy", "model.hidden=[32]", "optimizer.lr=0.5",
                       "trainer.max_steps=60", "summary.converge_below=0.5"], cwd=tmp_path)
    line = last_line(result)
    run_dir = tmp_path / shlex.split(line["folder"])[0]
    record = strict_json(RunPaths(run_dir).record)
    accuracy = end_mean(read_tb(run_dir)["train/accuracy"])  # the last 6 steps' batches
    assert record["accuracy_final"] == pytest.approx(accuracy, rel=1e-6)
    assert float(line["accuracy"]) == pytest.approx(100 * accuracy, abs=0.05)
    assert line["verdict"] == record["verdict"] and line["evidence"] == record["findings"][0]["detail"]


def test_a_dead_layer_run_gives_its_evidence_and_the_findings_as_tensorboard_text(tmp_path):
    line = last_line(train_py(["model=mlp", "model.bias_init=-5.0", "trainer.max_steps=40"], cwd=tmp_path))
    run_dir = tmp_path / shlex.split(line["folder"])[0]
    record = strict_json(run_dir / "run.json")
    assert line["verdict"] == record["verdict"] == verdict(diagnose_run(run_dir)) == "dead_layer"
    assert int(line["steps"]) == record["steps"] == 40
    assert float(line["loss"]) == pytest.approx(record["final_loss"], rel=1e-3)
    evidence = "all 16 units of layer 1 dead from step 0 to the end"
    assert line["evidence"] == record["findings"][0]["detail"] == evidence
    assert line["line"] == (f"gradwatch: dead_layer after 40 steps: {evidence}. Also found: dead_layer in layer 3. "
                            f"Final loss {read_tb(run_dir)['train/loss'][39]:.4g}, 100% of ReLU units dead.")
    # TensorBoard's text plugin carries the same findings.
    acc = EventAccumulator(str(RunPaths(run_dir).tb), size_guidance={"tensors": 0})
    acc.Reload()
    assert acc.SummaryMetadata("findings").plugin_data.plugin_name == "text"
    (event,) = acc.Tensors("findings")
    text = event.tensor_proto.string_val[0].decode()
    assert text.splitlines()[0] == "**verdict: dead_layer**"
    assert [line for line in text.splitlines() if line.startswith("- ")] == [
        "- `dead_layer`: all 16 units of layer 1 dead from step 0 to the end",
        "- `dead_layer`: all 16 units of layer 3 dead from step 0 to the end"]


def test_a_loss_that_touched_the_threshold_once_is_not_converged(tmp_path):
    """Minibatches of 4 noisy points: a batch dips below 0.003 long before the loss ends there."""
    run_dir = tmp_path / "run"
    line = last_line(train_py(["model=linear", "dataset.noise=0.1", "dataset.batch_size=4", "optimizer.lr=0.05",
                               "summary.converge_below=0.003", f"hydra.run.dir={run_dir}"], cwd=tmp_path))
    losses = read_tb(run_dir)["train/loss"]
    first = min(step for step, loss in losses.items() if loss <= 0.003)
    at_end = float(np.median([losses[s] for s in sorted(losses)[-20:]]))  # the last tenth of 200 steps
    assert at_end > 0.003
    record = strict_json(RunPaths(run_dir).record)
    assert (record["converged"], record["steps_to_converge"]) == (False, first)
    assert line["verdict"] == record["verdict"] == "learning"
    assert line["evidence"] == (f"loss fell {1 - at_end / losses[0]:.1%} from {losses[0]:.3g} at step 0 to "
                                f"{at_end:.3g} (median of the last 20 logged steps); it was at or below 0.003 "
                                f"at step {first} but did not stay there")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(run_dir / "summary.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert (row["converged"], row["verdict"], float(row["steps_to_converge"])) == ("False", "learning", first)
