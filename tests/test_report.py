"""The report's figures: the data behind each panel (not pixels), and the files it writes."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from gradwatch.storage.parquet import read_metrics
from gradwatch.summary import report
from gradwatch.summary.findings import Curves, diagnose_run, diagnosis_tag
from gradwatch.summary.table import Summary, summarize

from conftest import train

PNG = b"\x89PNG\r\n\x1a\n"


def make_summary(runs: list[dict], swept: list[str], losses: dict[str, list[float]]) -> Summary:
    table = pd.DataFrame(runs)
    curves = pd.concat([pd.DataFrame(columns=["run_dir", "step", "loss"])]
                       + [pd.DataFrame({"run_dir": rd, "step": np.arange(len(v)), "loss": v})
                          for rd, v in losses.items()], ignore_index=True)
    return Summary(table, pd.DataFrame(), swept, curves)


def long(curves: dict[str, list[float]]) -> pd.DataFrame:
    rows = [(step, tag, values[step]) for step in range(max(map(len, curves.values())))
            for tag, values in curves.items() if step < len(values)]
    return pd.DataFrame(rows, columns=["step", "tag", "value"])


@pytest.fixture
def sweep() -> tuple[Summary, dict]:
    """2 models x 2 learning rates x 2 seeds; mlp at lr 1.0 diverges on seed 1 at step 2."""
    runs, losses, metrics = [], {}, {}
    for model in ("linear", "mlp"):
        for lr in (0.1, 1.0):
            for seed in (0, 1):
                rd = f"{model}-{lr}-{seed}"
                blowup = model == "mlp" and lr == 1.0 and seed == 1
                loss = [4.0, 2.0, math.inf, math.nan] if blowup else [4.0, 1.0 + seed, 0.5 * lr, 1e-4 * lr]
                losses[rd] = loss
                runs.append({"run_dir": rd, "status": "completed", "model": model, "optimizer.lr": lr,
                             "seed": seed, "converged": loss[-1] <= 1e-3, "diverged": blowup,
                             "final_loss": loss[-1]})
                curves = {"train/loss": loss, "grad/0.weight/norm": [1.0, 1.0, 1.0, 1.0]}
                if model == "mlp":
                    curves |= {"grad/0.bias/norm": [9.0] * 4, "grad/2.weight/norm": [10.0, 20.0, 30.0, 40.0],
                               "act/1/dead_fraction": [0.0, 0.5, 1.0, 1.0], "act/3/dead_fraction": [0.0] * 4}
                metrics[rd] = long(curves)
    return make_summary(runs, ["model", "optimizer.lr"], losses), metrics


def test_layout_lines_are_the_key_with_most_values_and_panels_the_rest():
    runs = [{"run_dir": f"r{a}{lr}{b}", "a": a, "optimizer.lr": lr, "b": b}
            for a in ("x", "y") for lr in (1.0, 0.001, 0.1, 0.01) for b in (3, 10, 2)]
    plan = report.layout(make_summary(runs, ["a", "optimizer.lr", "b"], {}))
    assert plan.line_key == "optimizer.lr"
    assert plan.lines == ["0.001", "0.01", "0.1", "1.0"]  # by value
    assert plan.panels == [f"a={a}, b={b}" for a in ("x", "y") for b in (2, 3, 10)]  # natural order
    assert plan.runs.loc["rx0.0013", ["panel", "line"]].tolist() == ["a=x, b=3", "0.001"]


def test_layout_splits_a_key_with_too_many_values_into_panels():
    runs = [{"run_dir": f"r{i}", "optimizer.lr": i / 100} for i in range(30)]
    plan = report.layout(make_summary(runs, ["optimizer.lr"], {}))
    assert len(plan.lines) == 30 and plan.panels == [f"lr part {i}/3" for i in (1, 2, 3)]
    per_panel = plan.runs.groupby("panel")["line"].nunique()
    assert per_panel.max() <= report.MAX_LINES


def test_one_run_is_one_panel_with_one_line():
    summary = make_summary([{"run_dir": ".", "status": "completed"}], [], {".": [1.0, 0.5]})
    plan = report.layout(summary)
    assert plan.panels == [""] and plan.lines == ["all runs"]
    assert report.loss_curves(summary, plan)["loss"].tolist() == [1.0, 0.5]


def test_loss_curves_are_means_over_seeds_of_finite_values(sweep):
    summary, _ = sweep
    curves = report.loss_curves(summary, report.layout(summary)).set_index(["panel", "line", "step"])["loss"]
    assert curves.loc[("model=linear", "0.1")].tolist() == [4.0, 1.5, 0.05, 1e-5]
    # mlp lr 1.0: seed 1 is non-finite from step 2, so seed 0 alone is the curve there.
    assert curves.loc[("model=mlp", "1.0")].tolist() == [4.0, 1.5, 0.5, 1e-4]


def test_divergences_mark_the_first_nonfinite_step_at_the_last_finite_loss(sweep):
    summary, metrics = sweep
    for given in (None, metrics):
        marks = report.divergences(summary, given)
        assert marks.to_dict("records") == [{"run_dir": "mlp-1.0-1", "step": 2, "loss": 2.0}]


def test_divergence_from_gradients_when_the_loss_stays_finite():
    summary = make_summary([{"run_dir": "r", "diverged": True}], [], {"r": [1.0, 0.5, 0.4]})
    metrics = {"r": long({"train/loss": [1.0, 0.5, 0.4], "grad/0.weight/nonfinite": [0, 3, 3]})}
    assert report.divergences(summary, metrics).to_dict("records") == [{"run_dir": "r", "step": 1, "loss": 1.0}]
    # Without metrics, the table's `diverged` marks its last step.
    assert report.divergences(summary).to_dict("records") == [{"run_dir": "r", "step": 2, "loss": 0.5}]


def test_loss_range_is_not_stretched_by_a_diverged_run():
    curves = pd.DataFrame({"loss": [4.0, 1.0, 1e-4, 1e36, 1e37]})
    low, high = report.loss_ylim(curves, np.array([4.0, 3.0]))
    assert high == 40.0 and low == 1e-4 / 2  # the lowest point shows


def test_heatmap_is_the_convergence_rate_over_the_two_keys_with_most_values(sweep):
    summary, _ = sweep
    metric, data = report.heatmap_data(summary)
    assert metric == "converged"
    cells = data.set_index(["row", "col"])
    assert cells.loc[("linear", "0.1"), "value"] == 1.0  # 1e-5 and 1e-5 both under 1e-3
    assert cells.loc[("mlp", "1.0"), ["value", "runs", "diverged"]].tolist() == [0.5, 2, 1]
    assert cells.loc[("linear", "1.0"), "value"] == 1.0
    assert set(data["facet"]) == {""}


def test_heatmap_falls_back_to_final_loss_and_facets_the_other_keys():
    runs = [{"run_dir": f"{a}{b}{c}", "a": a, "b": b, "c": c, "converged": False, "diverged": a == 2 and b == 2,
             "final_loss": float(a * b)} for a in (1, 2, 3) for b in (1, 2) for c in ("p", "q")]
    metric, data = report.heatmap_data(make_summary(runs, ["c", "b", "a"], {}))
    assert metric == "final_loss"
    assert data.attrs == {"row_key": "a", "col_key": "c"}  # b and c tie at 2 values: the sweep's order
    assert sorted(data["facet"].unique()) == ["b=1", "b=2"]
    cells = data[data["facet"] == "b=2"].set_index(["row", "col"])["value"]
    assert cells[("3", "p")] == 6.0 and math.isnan(cells[("2", "p")])  # a diverged run has no final loss


def test_dead_fraction_is_the_worst_layer_then_the_seed_mean(sweep):
    summary, metrics = sweep
    plan = report.layout(summary)
    data = report.dead_fraction_curves(plan, metrics).set_index(["panel", "line", "step"])["dead_fraction"]
    assert set(data.index.get_level_values("panel")) == {"model=mlp"}  # linear runs have no ReLUs
    # Layer 1 dies (0, 0.5, 1, 1) while layer 3 stays alive: the figure shows layer 1, not their mean.
    assert data.loc[("model=mlp", "0.1")].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert plan.per_setting == "mean over 2 seeds"


def test_gradient_flow_is_per_weight_in_network_order_before_divergence(sweep):
    summary, metrics = sweep
    flow = report.gradient_flow(report.layout(summary), metrics).set_index(["panel", "line", "depth"])
    mlp = flow.loc[("model=mlp", "0.1")]
    assert mlp["param"].tolist() == ["0.weight", "2.weight"]  # biases are not layers here
    assert mlp["norm"].tolist() == [1.0, 25.0]  # median of 10, 20, 30, 40
    assert mlp["low"].tolist() == pytest.approx([1.0, np.percentile([10, 20, 30, 40], 10)])
    # The diverged seed counts its steps 0-1 only: median 15; the seed median is (25 + 15) / 2.
    assert flow.loc[("model=mlp", "1.0"), "norm"].tolist() == [1.0, 20.0]


def test_render_reports_writes_every_figure(sweep):
    summary, metrics = sweep
    pngs = report.render_reports(summary, metrics)
    assert sorted(pngs) == ["report.png", "report_dead.png", "report_gradients.png", "report_heatmap.png"]
    assert all(png.startswith(PNG) for png in pngs.values())
    assert sorted(report.render_reports(summary)) == ["report.png", "report_heatmap.png"]


def test_curves_can_stand_for_metrics(sweep):
    summary, metrics = sweep
    plan = report.layout(summary)
    as_curves = {rd: Curves(m) for rd, m in metrics.items()}
    pd.testing.assert_frame_equal(report.gradient_flow(plan, metrics), report.gradient_flow(plan, as_curves))


def test_report_of_real_runs_marks_the_diverged_one(tmp_path):
    for name, lr in (("0_a", 0.05), ("1_b", 0.2)):
        train(["model=linear", "dataset=line_2x", f"optimizer.lr={lr}", "trainer.max_steps=80"], tmp_path / name)
    summary = summarize(tmp_path)
    metrics = {rd: read_metrics(tmp_path / rd, keep=diagnosis_tag) for rd in summary.runs["run_dir"]}
    marks = report.divergences(summary, metrics)
    (diverged,) = [f for f in diagnose_run(tmp_path / "1_b") if f.code == "diverged"]
    assert marks.to_dict("records")[0]["run_dir"] == "1_b" and marks["step"].tolist() == [diverged.step]
    assert report.layout(summary).lines == ["0.05", "0.2"]
    pngs = report.render_reports(summary, metrics)
    assert sorted(pngs) == ["report.png", "report_heatmap.png"]  # linear: no ReLUs, one weight layer
    # One run alone gets the same figures.
    one = summarize(tmp_path / "0_a")
    assert sorted(report.render_reports(one, {".": read_metrics(tmp_path / "0_a")})) == sorted(pngs)


def _size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _grid_summary(rows: list, cols: list, facets: list = (None,), seeds: int = 2) -> Summary:
    runs, losses = [], {}
    for f in facets:
        for r in rows:
            for c in cols:
                for seed in range(seeds):
                    rd = f"{f}-{r}-{c}-{seed}"
                    losses[rd] = [1.0, 0.5 / (1 + seed)]
                    runs.append({"run_dir": rd, "model.hidden": r, "optimizer.lr": c, "dataset": f, "seed": seed,
                                 "converged": False, "diverged": False, "final_loss": losses[rd][-1]})
    swept = ["model.hidden", "optimizer.lr"] + (["dataset"] if facets != (None,) else [])
    return make_summary(runs, swept, losses)


def test_figures_grow_with_what_they_hold():
    small = report.render_reports(_grid_summary(["[8]", "[16]"], [0.1, 0.01]))
    big = report.render_reports(_grid_summary(["[32,32]", "[32,32,32,32,32,32]", "[64]", "[8]", "[16]", "[4]"],
                                              [0.1, 0.01, 0.001, 0.3, 0.03, 0.003, 1.0, 0.5],
                                              facets=("digits", "line_2x", "sum_x1_x2")))
    for name in ("report.png", "report_heatmap.png"):
        (w1, h1), (w2, h2) = _size(small[name]), _size(big[name])
        assert w2 > w1 and h2 > h1, (name, (w1, h1), (w2, h2))


def _cut(fig) -> list[str]:
    """What of a drawn figure sticks out of it: each visible panel with its titles and drawn tick
    labels (colour bars are panels too), the figure's titles and its legends. None when nothing is cut."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    parts = [(f"panel {ax.get_title()!r}", ax.get_tightbbox(renderer)) for ax in fig.axes if ax.get_visible()]
    texts = dict.fromkeys((fig._suptitle, fig._supxlabel, fig._supylabel, *fig.texts))  # suptitle is a text too
    texts = [t for t in texts if t and t.get_text()]
    parts += [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    parts += [("legend", legend.get_window_extent(renderer)) for legend in fig.legends]
    return [name for name, e in parts
            if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1]


def test_no_title_tick_or_colour_bar_label_is_cut():
    summary = _grid_summary(["[32,32]", "[32,32,32,32,32,32]"], [0.1, 0.001], facets=("digits", "sum_x1_x2"))
    figures = report.figures(summary)
    for name, fig in figures.items():
        assert _cut(fig) == [], name
    cut = plt.figure(figsize=(2, 1))
    cut.suptitle("a title longer than its figure is wide")
    assert _cut(cut) == ["a title longer than its figure is wide"]  # the check sees a cut
    plt.close(cut)
    heatmap = figures["report_heatmap.png"]
    ticks = [t.get_text() for ax in heatmap.axes for t in ax.get_yticklabels()]
    assert "6x[32]" in ticks and "[32,32]" in ticks  # a long repeated list by its repeat
    assert "mean over 2 seeds" in heatmap._suptitle.get_text()


def test_diverged_settings_are_black_and_in_the_legend(sweep):
    summary, _ = sweep
    runs = summary.runs.copy()
    every = (runs["model"] == "linear") & (runs["optimizer.lr"] == 1.0)
    runs.loc[every, "diverged"] = True
    fig = report.draw_heatmap(Summary(runs, pd.DataFrame(), summary.swept, summary.curves))
    black = [p for p in fig.axes[0].patches if p.get_facecolor()[:3] == (0.0, 0.0, 0.0)]
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(black) == 1 and len(hatched) == 1  # linear at 1.0: both seeds; mlp at 1.0: one of two
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["every run diverged",
                                                                   "some runs diverged (k/n div)"]
    assert "diverged" in [t.get_text() for t in fig.axes[0].texts]


def test_legend_lists_only_lines_the_figure_draws():
    runs, losses, metrics = [], {}, {}
    for activation in ("relu", "sigmoid"):
        for seed in (0, 1):
            rd = f"{activation}-{seed}"
            losses[rd] = [1.0, 0.5]
            runs.append({"run_dir": rd, "model.activation": activation, "seed": seed, "final_loss": 0.5})
            curves = {"train/loss": [1.0, 0.5], "grad/0.weight/norm": [1.0, 1.0], "grad/2.weight/norm": [2.0, 2.0]}
            if activation == "relu":
                curves["act/1/dead_fraction"] = [0.0, 1.0]
            metrics[rd] = long(curves)
    figures = report.figures(make_summary(runs, ["model.activation"], losses), metrics)
    legend = {name: [t.get_text() for t in fig.legends[0].get_texts()] for name, fig in figures.items()
              if fig.legends}
    assert legend["report_dead.png"] == ["relu"]  # sigmoid has no ReLU layer, so no line
    assert legend["report.png"] == ["relu", "sigmoid"]


def test_a_continuous_key_is_a_scatter_on_a_log_axis():
    rates = [0.010716295704927558, 0.0003311, 0.21, 0.0042]
    runs = [{"run_dir": str(i), "optimizer.lr": lr, "model.hidden": "[8]" if i % 2 else "[16,16]",
             "final_loss": [0.1, 0.5, math.inf, 0.2][i], "diverged": i == 2} for i, lr in enumerate(rates)]
    summary = make_summary(runs, ["optimizer.lr", "model.hidden"], {str(i): [1.0, 0.5] for i in range(4)})
    assert report.continuous_key(summary) == "optimizer.lr"
    data = report.scatter_data(summary, "optimizer.lr")
    assert data["x"].tolist() == rates and data["diverged"].tolist() == [False, False, True, False]
    assert data["group"].tolist() == ["[16,16]", "[8]"] * 2
    assert math.isnan(data["final_loss"][2]) and data["final_loss"][3] == 0.2
    figures = report.figures(summary)
    assert sorted(figures) == ["report.png", "report_scatter.png"]
    (ax,) = figures["report_scatter.png"].axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert report.layout(summary).lines == ["0.000331", "0.0042", "0.0107", "0.21"]  # 3 digits, by value
    # Typed grid values stay a heatmap.
    assert report.continuous_key(make_summary([{"run_dir": "a", "optimizer.lr": 0.001}, {"run_dir": "b",
                                               "optimizer.lr": 0.05}], ["optimizer.lr"], {})) is None
