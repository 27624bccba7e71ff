"""Findings and verdicts: hand-built curves with known answers, then real runs whose fate is known."""

import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.storage.parquet import read_metrics
from gradwatch.storage.paths import RunPaths
from gradwatch.summary.findings import (
    NO_VERDICT,
    VERDICT_ORDER,
    Curves,
    Finding,
    Thresholds,
    as_markdown,
    codes,
    diagnose,
    diagnose_run,
    diagnosis_tag,
    evidence,
    in_words,
    verdict,
    what_happened,
)
from gradwatch.summary.table import write_summary

from conftest import CONF, read_tb, strict_json, train

LIMITS = Thresholds(dying_rise=0.25, vanishing_ratio=1e-3, exploding_factor=100.0, stall_improvement=0.01,
                    converge_below=1e-3, converge_relative=False)


def frame(curves: dict[str, list[float]], categorical: bool = True) -> pd.DataFrame:
    """The long format the parquet sink writes: step by step, tags in the given (network) order."""
    rows = [(step, tag, values[step]) for step in range(max(map(len, curves.values())))
            for tag, values in curves.items() if step < len(values)]
    metrics = pd.DataFrame(rows, columns=["step", "tag", "value"])
    if categorical:
        metrics["tag"] = pd.Categorical(metrics["tag"], categories=sorted(curves))  # not network order
    return metrics


def found(curves: dict[str, list[float]], limits: Thresholds = LIMITS, **kwargs) -> dict[str, list[Finding]]:
    by_code: dict[str, list[Finding]] = {}
    for finding in diagnose(frame(curves), limits, **kwargs):
        by_code.setdefault(finding.code, []).append(finding)
    return by_code


# --- converged and stalled -------------------------------------------------------------------

def test_converged_when_the_end_is_at_or_below_the_threshold_from_the_first_step_there():
    # The end: the median of the last 3 losses (0.01, 0.001, 0.0001) is 0.001.
    result = found({"train/loss": [4.0, 1.0, 0.01, 0.001, 0.0001]})
    assert list(result) == ["converged"]
    assert result["converged"] == [Finding(
        "converged", 3, "loss",
        "loss ended at 0.001 (median of the last 3 logged steps), at or below 0.001; first there at step 3 with 0.001")]


def test_touching_the_threshold_once_is_learning_not_converged():
    loss = [4.0, 2.0, 0.0005, 1.2, 1.1, 1.0]
    assert list(found({"train/loss": loss})) == ["learning"]
    (learning,) = found({"train/loss": loss})["learning"]
    assert learning == Finding("learning", 5, "loss", "loss fell 72.5% from 4 at step 0 to 1.1 (median of the last 3 "
                               "logged steps); it was at or below 0.001 at step 2 but did not stay there")


def test_learning_when_nothing_holds_and_the_loss_fell():
    loss = list(np.geomspace(1.0, 0.1, 20))
    (learning,) = found({"train/loss": loss})["learning"]
    end = float(np.median(loss[-3:]))
    assert learning.detail == (f"loss fell {1 - end:.1%} from 1 at step 0 to {end:.3g} (median of the last 3 "
                               "logged steps); not yet at or below 0.001")
    assert verdict(diagnose(frame({"train/loss": loss}), LIMITS)) == "learning"
    # A fall short of 100% is never rounded up to it.
    falling = list(np.geomspace(100.0, 0.01, 20))  # the end: 0.0162, the median of the last 3
    (learning,) = found({"train/loss": falling})["learning"]
    assert learning.detail.startswith("loss fell 99.98% from 100 at step 0 to 0.0162 ")


def test_a_loss_that_ends_no_lower_than_it_started_is_stalled_whatever_the_last_half_did():
    loss = [1.0, 3.0, 3.0, 3.0, 2.0, 1.5, 1.2, 1.1, 1.05, 1.0]
    assert found({"train/loss": loss})["stalled"] == [
        Finding("stalled", 0, "loss", "loss ended at 1.05 (median of the last 3 logged steps), no lower than 1 "
                                      "at step 0")]


def test_one_logged_loss_is_too_short_to_judge():
    assert diagnose(frame({"train/loss": [1.0]}), LIMITS) == []
    assert verdict([]) == NO_VERDICT == "too_short"


def test_converged_relative_to_the_step_zero_loss():
    limits = Thresholds(**{**LIMITS.__dict__, "converge_below": 0.01, "converge_relative": True})
    result = found({"train/loss": [4.0, 1.0, 0.04, 0.03, 0.03]}, limits)
    assert result["converged"][0].step == 2
    assert result["converged"][0].detail == ("loss ended at 0.03 (median of the last 3 logged steps), at or below "
                                             "0.04 = 0.01 x the step-0 loss; first there at step 2 with 0.04")


def test_stalled_when_the_last_half_gains_under_the_threshold():
    # 20 steps: the middle is the median of steps 8-10, the end the median of steps 17-19.
    loss = [10.0] * 5 + [2.0] * 4 + [1.0] * 3 + [0.995] * 8
    assert found({"train/loss": loss})["stalled"] == [
        Finding("stalled", 10, "loss",
                "loss improved only 0.5% over the last half, less than 1%: 1 at step 10, 0.995 at step 19 "
                "(medians of 3 logged steps)")]
    loss[9] = 2.0  # the middle is now 2: half better since
    assert "stalled" not in found({"train/loss": loss})


def test_stalled_uses_relative_improvement_over_the_last_half():
    steps = 20
    gain_2pct = [1.0] * 10 + list(np.linspace(1.0, 0.98, 10))
    assert "stalled" not in found({"train/loss": gain_2pct})
    gain_half_pct = [1.0] * 10 + list(np.linspace(1.0, 0.995, 10))
    (stalled,) = found({"train/loss": gain_half_pct})["stalled"]
    assert stalled.step == 10 and len(gain_half_pct) == steps
    assert "improved only 0.4% over the last half, less than 1%" in stalled.detail  # median of the last 3


def test_a_converged_run_is_not_stalled_however_flat_its_end():
    assert list(found({"train/loss": [1.0, 1e-4, 1e-4, 1e-4]})) == ["converged"]


# --- diverged --------------------------------------------------------------------------------

def test_diverged_on_the_loss_alone_names_the_loss():
    result = found({"train/loss": [1.0, 2.0, math.inf, math.nan], "grad/0.weight/norm": [1.0, 2.0, 3.0, 4.0],
                    "grad/0.weight/nonfinite": [0, 0, 0, 0]})
    assert result["diverged"] == [
        Finding("diverged", 2, "loss", "loss went non-finite at step 2, last finite 2 at step 1")]
    assert "converged" not in result and "stalled" not in result


def test_diverged_names_the_first_parameter_in_network_order_that_went_nonfinite():
    curves = {"train/loss": [1.0, 2.0, 3.0, math.nan],
              "grad/0.weight/norm": [1.0, 1.0, math.inf, math.nan], "grad/0.weight/nonfinite": [0, 0, 2, 4],
              "grad/2.weight/norm": [1.0, 1.0, math.inf, math.nan], "grad/2.weight/nonfinite": [0, 0, 1, 4],
              "grad/10.weight/norm": [1.0, math.nan, 1.0, 1.0], "grad/10.weight/nonfinite": [0, 1, 0, 0]}
    (diverged,) = found(curves)["diverged"]
    # 10.weight went first (step 1), though it sorts before 2.weight as text and comes last in the net.
    assert (diverged.step, diverged.where) == (1, "10.weight")
    assert diverged.detail == "gradient of 10.weight went non-finite at step 1 (1 value) with loss 2"
    curves["grad/10.weight/norm"][1], curves["grad/10.weight/nonfinite"][1] = 1.0, 0
    (diverged,) = found(curves)["diverged"]
    assert (diverged.step, diverged.where) == (2, "0.weight")  # both at step 2: the first in the network


def test_a_nonfinite_number_in_a_detail_is_spelled_nan():
    (diverged,) = found({"train/loss": [1.0, math.inf], "grad/global_norm": [1.0, math.inf]})["diverged"]
    assert diverged.detail == "global gradient norm went non-finite at step 1 with loss nan"


def test_a_nonfinite_gradient_statistic_counts_without_a_nonfinite_count():
    (diverged,) = found({"train/loss": [1.0, 1.0, 1.0], "grad/0.weight/norm": [1.0, 1.0, 1.0],
                         "grad/0.bias/norm": [1.0, math.inf, 1.0]})["diverged"]
    assert (diverged.step, diverged.where) == (1, "0.bias")


def test_findings_after_divergence_ignore_the_nan_artefacts():
    # NaN activations look like dead units (ReLU(NaN) never fires): not a dead layer.
    result = found({"train/loss": [1.0, 0.5, math.nan, math.nan], "act/1/dead_fraction": [0.0, 0.0, 1.0, 1.0]})
    assert list(result) == ["diverged"]


# --- dead layers and dying ReLUs ------------------------------------------------------------------

def test_dead_layer_from_the_step_it_stayed_dead():
    curves = {"train/loss": [1.0] * 7,
              "act/1/dead_fraction": [0.25, 0.5, 1.0, 0.75, 1.0, 1.0, 1.0],
              "act/3/dead_fraction": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5]}
    result = found(curves)
    assert result["dead_layer"] == [
        Finding("dead_layer", 4, "1", "all units of layer 1 dead from step 4 to the end, 25% dead at step 0")]
    assert result["dying_relu"][0].where == "3"  # layer 1's death is not repeated as dying
    (dead,) = found(curves, units={"1": 16})["dead_layer"]
    assert dead.detail == "all 16 units of layer 1 dead from step 4 to the end, 25% dead at step 0"


def test_dead_layer_from_step_zero():
    (dead,) = found({"train/loss": [1.0, 0.9], "act/1/dead_fraction": [1.0, 1.0]})["dead_layer"]
    assert (dead.step, dead.detail) == (0, "all units of layer 1 dead from step 0 to the end")
    (dead,) = found({"train/loss": [1.0, 0.9], "act/1/dead_fraction": [1.0, 1.0]}, units={"1": 1})["dead_layer"]
    assert dead.detail == "the only unit of layer 1 dead from step 0 to the end"


def test_dying_relu_when_the_end_is_a_rise_above_step_zero():
    # 20 steps: the end is the median of the last three, the rise counted from step 0.
    rising = [0.1, 0.1, 0.2, 0.4, 0.3] + [0.4] * 15
    below = [0.1] + [0.3] * 19
    result = found({"train/loss": [1.0] * 20, "act/1/dead_fraction": rising, "act/3/dead_fraction": below})
    (dying,) = result["dying_relu"]
    assert (dying.step, dying.where) == (3, "1")
    assert dying.detail == ("dead units in layer 1 rose from 10% at step 0 to 40% (median of the last 3 logged "
                            "steps); the rise reached 25 points at step 3")


def test_one_noisy_batch_at_the_end_is_not_a_dying_layer():
    noisy_end = [0.0] * 19 + [0.5]
    assert "dying_relu" not in found({"train/loss": [1.0] * 20, "act/1/dead_fraction": noisy_end})


# --- gradients --------------------------------------------------------------------------------

def test_vanishing_gradients_compare_the_first_and_last_weight_on_the_median_step():
    steps = 5
    last = [1.0, 2.0, 4.0, 0.0, 8.0]
    first = [1e-5, 2e-5, 4.0, 1.0, 8e-5]  # step 2 has ratio 1; step 3 has no last-layer gradient
    curves = {"train/loss": [1.0] * steps,
              "grad/0.weight/norm": first, "grad/0.bias/norm": [1.0] * steps,
              "grad/2.weight/norm": [1.0] * steps,
              "grad/4.weight/norm": last, "grad/4.bias/norm": [1e-9] * steps}  # last *weight*, not bias
    (vanishing,) = found(curves)["vanishing_gradients"]
    assert (vanishing.step, vanishing.where) == (0, "0.weight")
    assert vanishing.detail == ("gradient norm of 0.weight is 1e-05 x that of 4.weight (median of 4 steps); "
                                "the ratio is under 0.001 from step 0")
    curves["grad/0.weight/norm"] = [1e-3 * v for v in last]  # exactly the ratio: not below it
    assert "vanishing_gradients" not in found(curves)


def test_one_weight_has_nothing_to_vanish_against():
    assert "vanishing_gradients" not in found({"train/loss": [1.0, 1.0], "grad/0.weight/norm": [0.0, 0.0]})


def test_exploding_gradients_past_the_factor_times_step_zero():
    curves = {"train/loss": [1.0] * 5, "grad/0.weight/norm": [1.0, 1.0, 1.0, 100.0, 1.0],
              "grad/2.weight/norm": [1.0, 1.0, 1.0, 180.0, 1.0],
              "grad/global_norm": [2.0, 3.0, 50.0, 201.0, 1000.0]}
    (exploding,) = found(curves)["exploding_gradients"]
    assert (exploding.step, exploding.where) == (3, "2.weight")
    assert exploding.detail == ("global gradient norm reached 201 at step 3, 100 x its step-0 value of 2; "
                                "largest in 2.weight")
    curves["grad/global_norm"] = [2.0, 3.0, 50.0, 200.0, 199.0]
    assert "exploding_gradients" not in found(curves)


def test_exploding_measures_from_the_first_positive_norm():
    (exploding,) = found({"train/loss": [1.0] * 4, "grad/global_norm": [0.0, 1.0, 50.0, 150.0]})[
        "exploding_gradients"]
    assert exploding.step == 3 and "x its step-1 value of 1" in exploding.detail


# --- verdict, codes, reading ------------------------------------------------------------------

def test_verdict_order():
    every = [Finding(code, 0, "x", "") for code in reversed(VERDICT_ORDER)]
    for i, code in enumerate(VERDICT_ORDER):
        assert verdict([f for f in every if f.code not in VERDICT_ORDER[:i]]) == code
    assert verdict([]) == NO_VERDICT
    assert VERDICT_ORDER == ("diverged", "dead_layer", "vanishing_gradients", "exploding_gradients",
                             "dying_relu", "converged", "stalled", "learning")


def test_codes_words_and_markdown():
    findings = [Finding("dead_layer", 0, "1", "all units of layer 1 dead from step 0 to the end"),
                Finding("dead_layer", 0, "3", "all units of layer 3 dead from step 0 to the end"),
                Finding("stalled", 50, "loss", "flat")]
    assert codes(findings) == "dead_layer,stalled"
    record = {"verdict": verdict(findings), "steps": 60, "findings": [f.as_dict() for f in findings],
              "final_loss": float("inf"), "accuracy_final": 0.875, "dead_fraction_final": 0.75,
              "dead_fraction_layers": {"1": 1.0, "3": 0.5}}
    # The verdict, its evidence, the other findings, then the numbers; no parentheses in the frame.
    assert in_words(record) == (
        "dead_layer after 60 steps: all units of layer 1 dead from step 0 to the end. "
        "Also found: dead_layer in layer 3; stalled. Final loss nan, accuracy 87.5%, "
        "75% of ReLU units dead, worst layer 1 at 100%.")
    # Every layer alike: no worst layer to name.
    alike = {**record, "dead_fraction_final": 1.0, "dead_fraction_layers": {"1": 1.0, "3": 1.0}}
    assert in_words(alike).endswith(" Final loss nan, accuracy 87.5%, 100% of ReLU units dead.")
    assert in_words({"steps": 1, "final_loss": None}) == (
        "too_short after 1 step: too few steps logged to judge. Final loss nan.")
    # A record without its findings says what the verdict means.
    assert in_words({"verdict": "stalled", "steps": 9, "final_loss": 0.5}) == (
        "stalled after 9 steps: the loss stopped improving. Final loss 0.5.")
    assert evidence("dying_relu", [Finding("dying_relu", 3, "1", "rose"), Finding("dying_relu", 4, "3", "x"),
                                   Finding("dying_relu", 5, "9", "y"), Finding("converged", 9, "loss", "z")]) == (
        "rose. Also found: dying_relu in layers 3 and 9; converged.")
    assert evidence("dying_relu", [Finding("dying_relu", 3, "1", "rose"), Finding("dying_relu", 4, "3", "x"),
                                   Finding("dying_relu", 5, "9", "y"), Finding("dying_relu", 6, "11", "w")]) == (
        "rose. Also found: dying_relu in layers 3, 9 and 11.")
    assert as_markdown(findings).splitlines() == [
        "**verdict: dead_layer**", "",
        "- `dead_layer`: all units of layer 1 dead from step 0 to the end",
        "- `dead_layer`: all units of layer 3 dead from step 0 to the end",
        "- `stalled`: flat"]
    assert as_markdown([]) == "**verdict: too_short**: too few steps logged to judge"
    assert findings[0].as_dict() == {"code": "dead_layer", "step": 0, "where": "1",
                                     "detail": "all units of layer 1 dead from step 0 to the end"}


def test_curves_keep_network_order_and_the_last_value_of_a_step_written_twice():
    metrics = frame({"train/loss": [3.0, 2.0], "grad/10.weight/norm": [1.0, 1.0], "grad/2.weight/norm": [1.0, 1.0],
                     "act/3/dead_fraction": [0.0, 0.0], "act/1/dead_fraction": [0.0, 0.0]})
    metrics = pd.concat([metrics, pd.DataFrame({"step": [1], "tag": ["train/loss"], "value": [7.0]})])
    for table in (metrics, metrics.astype({"tag": str})):
        curves = Curves(table)
        assert curves.params() == ["10.weight", "2.weight"] and curves.layers() == ["3", "1"]
        steps, loss = curves.get("train/loss")
        assert steps.tolist() == [0, 1] and loss.tolist() == [3.0, 7.0]
        assert curves.get("train/loss", before=1)[1].tolist() == [3.0]
        assert len(curves.get("nothing")[0]) == 0


def test_diagnosis_reads_only_the_tags_it_needs():
    kept = [t for t in ["train/loss", "lr", "grad/global_norm", "grad/0.weight/norm", "grad/0.weight/mean",
                        "grad/0.weight/nonfinite", "act/1/dead_fraction", "act/1/zero_fraction",
                        "act/1/dead_fraction_epoch", "update/0.weight/ratio"] if diagnosis_tag(t)]
    assert kept == ["train/loss", "grad/global_norm", "grad/0.weight/norm", "grad/0.weight/nonfinite",
                    "act/1/dead_fraction"]


def test_threshold_defaults_are_the_configs():
    config = OmegaConf.load(CONF / "train.yaml")
    defaults = Thresholds()
    for key, value in config.diagnosis.items():
        assert getattr(defaults, key) == value
    assert defaults.converge_below == config.summary.converge_below
    assert defaults.converge_relative == config.summary.converge_relative
    partial = Thresholds.from_config({"diagnosis": {"dying_rise": 0.5}, "summary": {"converge_below": 0.1}})
    assert (partial.dying_rise, partial.converge_below, partial.vanishing_ratio) == (0.5, 0.1, defaults.vanishing_ratio)
    assert Thresholds.from_config(None) == defaults


# --- real runs whose fate is known --------------------------------------------------------------

def tb_texts(run_dir) -> dict[str, dict[int, str]]:
    """Every text summary in a run's TensorBoard files, by tag then step (the text plugin's tensors)."""
    acc = EventAccumulator(str(RunPaths(run_dir).tb), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"}


LINE = ["model=linear", "dataset=line_2x", "trainer.max_steps=200"]
SIGMOID_20 = ["model.hidden=[" + ",".join(["16"] * 20) + "]", "model.activation=sigmoid", "trainer.max_steps=100"]


def fate(overrides: list[str], run_dir) -> list[Finding]:
    """Train, then check that the run's end (run.json, TensorBoard text) and the summary
    (write_summary, summary.csv) say what `diagnose_run` says; the findings it returns."""
    train(overrides, run_dir)
    findings = diagnose_run(run_dir)
    record = strict_json(run_dir / "run.json")
    summary = write_summary(run_dir)
    table = pd.read_csv(run_dir / "summary.csv", keep_default_na=False)
    assert record["verdict"] == verdict(findings) == summary.runs.loc[0, "verdict"] == table.loc[0, "verdict"]
    assert summary.runs.loc[0, "findings"] == table.loc[0, "findings"] == codes(findings)
    # The run knew its layers' widths; the details may count units, the rest is the same.
    assert [(f["code"], f["step"], f["where"]) for f in record["findings"]] == [
        (f.code, f.step, f.where) for f in findings]
    (text,) = tb_texts(run_dir)["findings"].values()
    assert text.splitlines() == [f"**verdict: {verdict(findings)}**", "",
                                 *(f"- `{f['code']}`: {f['detail']}" for f in record["findings"])]
    # summary.md words each run's verdict as the console does (from files alone: no unit counts).
    markdown = (run_dir / "summary.md").read_text()
    assert f"\n- **.** {verdict(findings)}: {evidence(verdict(findings), findings)}\n" in markdown
    return findings


def test_linear_on_2x_at_lr_005_converges(run_dir):
    findings = fate([*LINE, "optimizer.lr=0.05"], run_dir)
    assert verdict(findings) == "converged" and codes(findings) == "converged"
    losses = read_tb(run_dir)["train/loss"]
    first = min(s for s, v in losses.items() if v <= 1e-3)
    assert findings[0].step == first


def test_linear_on_2x_at_lr_02_diverges_at_the_first_nonfinite_step(run_dir):
    findings = fate([*LINE, "optimizer.lr=0.2"], run_dir)
    assert verdict(findings) == "diverged"
    tb = read_tb(run_dir)
    first_bad = min(s for tag, curve in tb.items() if tag == "train/loss" or tag.startswith("grad/")
                    for s, v in curve.items() if not np.isfinite(v) or (tag.endswith("/nonfinite") and v > 0))
    (diverged,) = [f for f in findings if f.code == "diverged"]
    assert diverged.step == first_bad
    record = strict_json(run_dir / "run.json")
    assert record["status"] == "diverged" and record["findings"][0]["step"] == first_bad
    assert diverged.where == "loss"  # its gradients at that step are still finite floats
    # It got there by exploding: the global norm passed 100x its step-0 value first.
    (exploding,) = [f for f in findings if f.code == "exploding_gradients"]
    norms = tb["grad/global_norm"]
    assert exploding.step == min(s for s, v in norms.items() if v > 100 * norms[0])


def test_mlp_with_bias_minus_5_has_dead_layers_from_step_0(run_dir):
    findings = fate(["model=mlp", "model.bias_init=-5.0", "trainer.max_steps=100"], run_dir)
    assert verdict(findings) == "dead_layer"
    dead = [f for f in findings if f.code == "dead_layer"]
    assert [(f.where, f.step) for f in dead] == [("1", 0), ("3", 0)]
    # The run's end knew the widths (model.hidden): the details count the units.
    hidden = OmegaConf.load(run_dir / ".hydra" / "config.yaml").model.hidden
    details = [f["detail"] for f in strict_json(run_dir / "run.json")["findings"]][:2]
    assert details == [f"all {n} units of layer {layer} dead from step 0 to the end"
                       for layer, n in zip("13", hidden, strict=True)]
    assert all(v == 1.0 for v in read_tb(run_dir)["act/1/dead_fraction"].values())


def test_twenty_layer_sigmoid_mlp_has_vanishing_gradients(run_dir):
    findings = fate(SIGMOID_20, run_dir)
    assert verdict(findings) == "vanishing_gradients"
    (vanishing,) = [f for f in findings if f.code == "vanishing_gradients"]
    assert vanishing.where == "0.weight" and "x that of 40.weight (median of 100 steps)" in vanishing.detail
    tb = read_tb(run_dir)
    ratios = [tb["grad/0.weight/norm"][s] / tb["grad/40.weight/norm"][s] for s in tb["grad/0.weight/norm"]]
    assert np.median(ratios) < 1e-3


def test_seed_relu_off_has_a_dead_layer(run_dir):
    findings = fate(["experiment=seed_relu_off"], run_dir)
    assert verdict(findings) == "dead_layer"
    assert findings[0] == Finding("dead_layer", 0, "1", "all units of layer 1 dead from step 0 to the end")


def test_reading_all_tags_or_only_the_diagnosis_tags_finds_the_same(run_dir):
    train(["experiment=seed_relu_off"], run_dir)
    assert diagnose(read_metrics(run_dir)) == diagnose(read_metrics(run_dir, keep=diagnosis_tag))


@pytest.mark.parametrize("lr", ["0.001"])
def test_slow_linear_progress_is_learning_not_stalled(run_dir, lr):
    findings = fate([*LINE, f"optimizer.lr={lr}"], run_dir)
    assert codes(findings) == "learning"


def test_what_happened_names_the_settings_and_what_they_share():
    runs = pd.DataFrame({
        "model": ["mlp"] * 4 + ["linear"] * 4,
        "optimizer.lr": [0.1, 0.1, 1.0, 1.0] * 2,
        "findings": ["dead_layer,stalled", "dying_relu", "dead_layer", "", "converged", "converged",
                     "diverged,exploding_gradients", "diverged"],
    })
    lines = what_happened(runs, ["model", "optimizer.lr"])
    assert lines == [
        "- **Runs diverged** in 1 of 4 settings (2 of 8 runs): model=linear, optimizer.lr=1.0 (2/2).",
        "- **ReLUs died** in 2 of 4 settings (3 of 8 runs), all with model=mlp: "
        "model=mlp, optimizer.lr=0.1 (2/2); model=mlp, optimizer.lr=1.0 (1/2).",
        "- **Gradients exploded** in 1 of 4 settings (1 of 8 runs): model=linear, optimizer.lr=1.0 (1/2).",
        "- **The loss stalled** in 1 of 4 settings (1 of 8 runs): model=mlp, optimizer.lr=0.1 (1/2).",
        "- Nowhere: gradients vanished.",
    ]
    assert what_happened(runs, ["model", "optimizer.lr"], most=1)[1].endswith(
        "(2/2), and 1 more; by model: mlp 3/4, linear 0/4.")
    assert what_happened(runs.drop(columns="findings"), []) == []


def test_a_dead_layer_is_not_also_vanishing_gradients():
    # Layer 1 dies at step 2: from then on 0.weight gets no gradient, which is the dead layer's doing.
    curves = {"train/loss": [1.0] * 6, "grad/0.weight/norm": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
              "grad/2.weight/norm": [1.0] * 6, "act/1/dead_fraction": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]}
    result = found(curves)
    assert "vanishing_gradients" not in result and result["dead_layer"][0].step == 2
