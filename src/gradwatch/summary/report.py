"""The report people look at: PNG files in the sweep (or run) folder.

    report.png            loss curves per setting (mean over its seeds); diverged runs marked
                          (black x), never stretching the axis
    report_heatmap.png    the main metric (convergence rate, else final loss) over the two swept
                          keys with most values, one heatmap per value of the other keys; cells
                          with diverged runs hatched, black when every run diverged
    report_scatter.png    instead of the heatmap when a swept key is continuous (an Optuna
                          search's learning rates): the final loss of each run against that key
    report_dead.png       dead ReLU fraction over steps of each setting's worst layer
    report_gradients.png  gradient norm per layer, input to output (vanishing shows as a slope)

Settings share one layout: the swept key with most values (at most MAX_LINES) is the line in a
panel, the other keys make the panels (small multiples), so 48 runs and 200 read the same way.
Every figure is sized for what it holds (panels, cells, label lengths) and laid out by
matplotlib's constrained layout, so no title, tick or colour-bar label is cut.
Each figure's data comes from a function returning a DataFrame (tested); drawing is separate.

    >>> pngs = render_reports(summary, metrics_by_run)   # doctest: +SKIP
    >>> sorted(pngs)                                      # doctest: +SKIP
    ['report.png', 'report_dead.png', 'report_gradients.png', 'report_heatmap.png']
"""

import io
import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

from gradwatch.storage.paths import DEAD_PNG, GRADIENTS_PNG, HEATMAP_PNG, REPORT_PNG, SCATTER_PNG  # noqa: E402
from gradwatch.summary.findings import Curves, divergence  # noqa: E402
from gradwatch.summary.outcome import natural_key  # noqa: E402
from gradwatch.telemetry import tags  # noqa: E402

MAX_LINES = 12  # lines a panel can hold and still be told apart
MAX_POINTS = 400  # points per curve: enough for the eye, cheap to draw at 200 runs
SMOOTH = 40  # dead fractions: rolling mean over 1/SMOOTH of a run's logged steps
_PANEL_W, _PANEL_H, _DPI = 3.4, 2.5, 100


# --- layout: which setting goes to which panel and line ---------------------------------------

@dataclass
class Layout:
    """`runs`: per run_dir its `panel` title and `line` label; `lines`: line labels in order
    (one color each, shared by every panel); `panels`: panel titles in order; `per_setting`:
    the statistic over a setting's runs in words (`mean over 3 seeds`)."""

    runs: pd.DataFrame
    line_key: str | None
    panels: list[str]
    lines: list[str]
    per_setting: str = "mean over seeds"


def _sort_key(value) -> tuple:
    """Numbers by value, lists (`[16,16]`) by length then items, text in natural number order."""
    try:
        return (0, float(value), [])
    except (TypeError, ValueError):
        text = str(value)
        return (1, float(text.count(",")) if text.startswith("[") else 0.0, natural_key(text))


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def shown(value) -> str:
    """A swept value as a label: numbers to 3 significant digits (an Optuna learning rate
    0.010716295704927558 is `0.0107`), long lists by their repeat (`[32,32,32,32,32,32]` is `6x[32]`)."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        items = text.strip("[]").replace(" ", "").split(",")
        if text.startswith("[") and len(items) > 3 and len(set(items)) == 1:
            return f"{len(items)}x[{items[0]}]"
        return text
    return text if len(text) <= 6 else f"{number:.3g}"


def is_continuous(values) -> bool:
    """A numeric swept key drawn from a range (Optuna) rather than typed as a list: more values
    than a panel holds lines, or values that need more than 4 significant digits."""
    try:
        numbers = [float(v) for v in pd.unique(pd.Series(values).astype(str))]
    except (TypeError, ValueError):
        return False
    return len(numbers) > 1 and (len(numbers) > MAX_LINES or any(float(f"{v:.4g}") != v for v in numbers))


def swept_keys(summary) -> list[str]:
    """Swept keys present in the runs table, most values first (ties keep the sweep's order)."""
    keys = [k for k in summary.swept if k in summary.runs.columns]
    counts = {k: summary.runs[k].astype(str).nunique() for k in keys}
    return sorted(keys, key=lambda k: -counts[k])


def setting_labels(runs: pd.DataFrame, keys: list[str]) -> list[str]:
    """Each run's values of `keys` as a label: `model=mlp, lr=0.1` ("" with no keys)."""
    if not keys:
        return [""] * len(runs)
    return [", ".join(f"{_short(k)}={shown(v)}" for k, v in zip(keys, row, strict=True))
            for row in runs[keys].astype(str).itertuples(index=False)]


def _per_setting(counts: pd.Series) -> str:
    low, high = int(counts.min()), int(counts.max())
    if high <= 1:
        return "one run per setting"
    return f"mean over {low} seeds" if low == high else f"mean over {low}-{high} seeds"


def layout(summary) -> Layout:
    runs = summary.runs
    keys = swept_keys(summary)
    counts = {k: runs[k].astype(str).nunique() for k in keys}
    # Lines: the key with most values that fit a panel, a numeric one on a tie (a color ramp reads well).
    fitting = sorted((k for k in keys if counts[k] <= MAX_LINES),
                     key=lambda k: (-counts[k], not _numeric(list(runs[k].astype(str).unique()))))
    line_key = (fitting or keys or [None])[0]
    facets = [k for k in summary.swept if k in keys and k != line_key]
    frame = pd.DataFrame({"run_dir": runs["run_dir"].astype(str)})
    frame["line"] = [shown(v) for v in runs[line_key].astype(str)] if line_key else "all runs"
    frame["panel"] = setting_labels(runs, facets)
    lines = sorted(frame["line"].unique(), key=_sort_key) if line_key else ["all runs"]
    if len(lines) > MAX_LINES:  # one key with many values: chunks of MAX_LINES lines, one panel each
        chunk = {line: i // MAX_LINES for i, line in enumerate(lines)}
        n = math.ceil(len(lines) / MAX_LINES)
        frame["panel"] = [f"{p}{', ' if p else ''}{_short(line_key)} part {chunk[v] + 1}/{n}"
                          for p, v in zip(frame["panel"], frame["line"], strict=True)]
    order = {p: _panel_sort(p, runs, facets, frame) for p in frame["panel"].unique()}
    panels = sorted(order, key=order.get)
    per_setting = _per_setting(frame.groupby(["panel", "line"]).size()) if len(frame) else "no runs"
    return Layout(frame.set_index("run_dir"), line_key, panels, lines, per_setting)


def _panel_sort(panel: str, runs: pd.DataFrame, facets: list[str], frame: pd.DataFrame) -> tuple:
    row = runs.loc[(frame["panel"] == panel).to_numpy()].iloc[0]
    return (*[_sort_key(row[k]) for k in facets], panel)


# --- the data behind each figure -----------------------------------------------------------------

def _thin(steps: np.ndarray) -> np.ndarray:
    """A mask keeping at most MAX_POINTS evenly spread steps (and always the last)."""
    keep = np.zeros(len(steps), dtype=bool)
    keep[np.linspace(0, len(steps) - 1, min(len(steps), MAX_POINTS)).round().astype(int)] = True
    return keep


def _curves(metrics) -> Curves:
    return metrics if isinstance(metrics, Curves) else Curves(metrics)


def _by_setting(per_run: pd.DataFrame, plan: Layout, value: str, on: str = "step") -> pd.DataFrame:
    """Mean over the seeds of each setting, per `on`; non-finite values do not count."""
    if per_run.empty:
        return pd.DataFrame(columns=["panel", "line", on, value])
    frame = per_run.join(plan.runs[["panel", "line"]], on="run_dir")
    frame[value] = frame[value].where(np.isfinite(frame[value].to_numpy(dtype=float)))
    return frame.groupby(["panel", "line", on], sort=False)[value].mean().reset_index()


def loss_curves(summary, plan: Layout) -> pd.DataFrame:
    """panel, line, step, loss: the mean loss over seeds per setting (finite values only)."""
    curves = summary.curves
    if len(curves) == 0:
        return pd.DataFrame(columns=["panel", "line", "step", "loss"])
    parts = [frame[_thin(frame["step"].to_numpy())] for _, frame in curves.groupby("run_dir", sort=False)]
    return _by_setting(pd.concat(parts), plan, "loss")


def divergences(summary, metrics_by_run: Mapping | None = None) -> pd.DataFrame:
    """run_dir, step, loss: where each diverged run went non-finite, and its last finite loss
    before that step (where its marker goes). From the run's metrics when given (gradients
    count), else from its loss curve; a run the table calls diverged with a finite curve is
    marked at its last step."""
    rows = []
    flagged = set(summary.runs.loc[summary.runs.get("diverged", pd.Series(False, index=summary.runs.index))
                                   .fillna(False).astype(bool), "run_dir"].astype(str))
    for run_dir, curve in summary.curves.groupby("run_dir", sort=False):
        steps, loss = curve["step"].to_numpy(), curve["loss"].to_numpy(dtype=float)
        step = None
        metrics = (metrics_by_run or {}).get(str(run_dir))
        if metrics is not None:
            found = divergence(_curves(metrics))
            step = None if found is None else found.step
        elif not np.isfinite(loss).all():
            step = int(steps[np.argmax(~np.isfinite(loss))])
        if step is None and str(run_dir) in flagged and len(steps):
            step = int(steps[-1])
        if step is None:
            continue
        before = np.isfinite(loss) & (steps < step) if (steps < step).any() else np.isfinite(loss)
        rows.append((str(run_dir), step, float(loss[before][-1]) if before.any() else math.nan))
    return pd.DataFrame(rows, columns=["run_dir", "step", "loss"])


def loss_ylim(curves: pd.DataFrame, first_losses: np.ndarray) -> tuple[float, float]:
    """A log-scale y-range a diverged run does not stretch: from half the smallest positive
    plotted loss (every curve's lowest point shows) to 10x the largest step-0 loss (a loss
    above where it started has gone wrong; its line leaves the top and its marker sits inside
    the edge)."""
    values = curves["loss"].to_numpy(dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    starts = first_losses[np.isfinite(first_losses) & (first_losses > 0)]
    if not len(values):
        return 1e-3, 1.0
    top = 10 * float(starts.max()) if len(starts) else float(np.percentile(values, 99)) * 2
    bottom = float(values.min()) / 2
    return min(bottom, top / 10), max(top, bottom * 10)


def main_metric(summary) -> str:
    """`converged` (the rate) when it differs between settings, else `final_loss`."""
    runs = summary.runs
    if "converged" in runs and runs["converged"].notna().any():
        keys = swept_keys(summary)
        rates = runs.groupby(keys)["converged"].mean() if keys else runs["converged"].mean()
        if np.ndim(rates) and np.nanmax(rates) != np.nanmin(rates):
            return "converged"
    return "final_loss"


def heatmap_data(summary) -> tuple[str, pd.DataFrame]:
    """(metric, frame of facet, row, col, value, runs, diverged): the main metric per setting over
    the two swept keys with most values (rows: the one with most), one facet per value of the
    other keys. Convergence is a rate over seeds; final loss the mean over seeds (a diverged
    run's is left out; `diverged` counts them)."""
    runs = summary.runs.copy()
    metric = main_metric(summary)
    keys = swept_keys(summary)
    row_key, col_key = (keys + [None, None])[:2]
    facets = keys[2:]
    runs["row"] = runs[row_key].astype(str) if row_key else ""
    runs["col"] = runs[col_key].astype(str) if col_key else ""
    runs["facet"] = setting_labels(runs, facets)
    diverged = runs["diverged"].fillna(False).astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    runs["diverged"] = diverged
    if metric == "converged":
        runs["value"] = runs["converged"].astype(float)
        agg = "mean"
    else:
        runs["value"] = pd.to_numeric(runs["final_loss"], errors="coerce").where(~diverged)
        runs["value"] = runs["value"].where(np.isfinite(runs["value"]))
        agg = "mean"
    grouped = runs.groupby(["facet", "row", "col"], sort=False).agg(
        value=("value", agg), runs=("value", "size"), diverged=("diverged", "sum")).reset_index()
    grouped.attrs.update(row_key=row_key, col_key=col_key)
    return metric, grouped


def dead_fraction_curves(plan: Layout, metrics_by_run: Mapping) -> pd.DataFrame:
    """panel, line, step, dead_fraction: the dead fraction of a run's worst ReLU layer per step
    (the largest over its layers, so one dead layer among healthy ones shows as 1; a rolling
    mean over 1/SMOOTH of its steps), mean over the seeds of each setting; empty when no run has
    ReLU layers."""
    parts = []
    for run_dir, metrics in metrics_by_run.items():
        curves = _curves(metrics)
        layers = curves.layers()
        if run_dir not in plan.runs.index or not layers:
            continue
        series = [curves.get(tags.act(layer, "dead_fraction")) for layer in layers]
        steps = series[0][0]
        if all(np.array_equal(s, steps) for s, _ in series):
            worst = np.max([v for _, v in series], axis=0)
        else:  # layers logged on different steps: align by step
            worst = pd.concat([pd.Series(v, index=s) for s, v in series], axis=1).max(axis=1)
            steps, worst = worst.index.to_numpy(), worst.to_numpy()
        # A per-batch fraction flickers (a unit silent on one batch): a short rolling mean shows the trend.
        window = max(1, round(len(worst) / SMOOTH))
        worst = pd.Series(worst).rolling(window, center=True, min_periods=1).mean().to_numpy()
        keep = _thin(steps)
        parts.append(pd.DataFrame({"run_dir": run_dir, "step": steps[keep], "dead_fraction": worst[keep]}))
    if not parts:
        return pd.DataFrame(columns=["panel", "line", "step", "dead_fraction"])
    return _by_setting(pd.concat(parts, ignore_index=True), plan, "dead_fraction")


def gradient_flow(plan: Layout, metrics_by_run: Mapping) -> pd.DataFrame:
    """panel, line, depth, param, norm, low, high: per weight parameter in network order
    (depth 0 = the input layer), the median gradient norm over a run's steps before any
    divergence, and its 10th-90th percentile over steps; then the mean (and the widest band)
    over the seeds of each setting."""
    rows = []
    for run_dir, metrics in metrics_by_run.items():
        if run_dir not in plan.runs.index:
            continue
        curves = _curves(metrics)
        found = divergence(curves)
        end = None if found is None else found.step
        weights = [p for p in curves.params() if tags.is_weight(p)]
        for depth, param in enumerate(weights):
            _, norm = curves.get(tags.grad(param, "norm"), before=end)
            norm = norm[np.isfinite(norm)]
            if len(norm):
                low, mid, high = np.percentile(norm, [10, 50, 90])
                rows.append((run_dir, depth, param, mid, low, high))
    if not rows:
        return pd.DataFrame(columns=["panel", "line", "depth", "param", "norm", "low", "high"])
    frame = pd.DataFrame(rows, columns=["run_dir", "depth", "param", "norm", "low", "high"])
    frame = frame.join(plan.runs[["panel", "line"]], on="run_dir")
    return frame.groupby(["panel", "line", "depth"], sort=False).agg(
        param=("param", "first"), norm=("norm", "mean"), low=("low", "min"), high=("high", "max")).reset_index()


def continuous_key(summary) -> str | None:
    """The swept key drawn from a range (`is_continuous`), the one with most values."""
    return next((k for k in swept_keys(summary) if is_continuous(summary.runs[k])), None)


def scatter_data(summary, key: str) -> pd.DataFrame:
    """x, final_loss, diverged, group: one point per run, the continuous `key` against its final
    loss (NaN for a diverged run, drawn at the top), grouped by the other swept keys (by the
    value alone when there is one other key)."""
    runs = summary.runs
    others = [k for k in swept_keys(summary) if k != key]
    loss = pd.to_numeric(runs.get("final_loss"), errors="coerce").astype(float)
    diverged = runs["diverged"].fillna(False).astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    groups = ([shown(v) for v in runs[others[0]].astype(str)] if len(others) == 1
              else setting_labels(runs, others) if others else ["all runs"] * len(runs))
    return pd.DataFrame({"x": pd.to_numeric(runs[key], errors="coerce").astype(float).to_numpy(),
                         "final_loss": loss.where(np.isfinite(loss) & ~diverged).to_numpy(),
                         "diverged": diverged.to_numpy(), "group": groups})


# --- drawing --------------------------------------------------------------------------------------

# Few ticks and plain tick labels: tick artists and mathtext are most of matplotlib's time here.
_PLAIN = FuncFormatter(lambda v, _: f"{v:g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.0e}")
_CHAR_W = 0.075  # inches per character of an 8-point label
DIVERGED = dict(marker="X", color="black", s=55, edgecolors="white", linewidths=0.6, zorder=6)


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=5))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(_PLAIN)


def _legend_width(labels: list[str], title: str) -> float:
    """Inches a legend of `labels` needs right of the panels."""
    longest = max([len(line) for label in labels for line in str(label).split("\n")] + [len(title) * 1.1])
    return 0.7 + _CHAR_W * longest


def _wrap(text: str, inches: float) -> str:
    return textwrap.fill(text, max(20, int(inches / _CHAR_W)))


def _grid(panels: list[str], xlabel: str, ylabel: str, legend: float, log_y: bool = False):
    """A figure of small multiples sharing both axes, sized for its panels and a legend `legend`
    inches wide; tick labels on the outer panels only, titles wrapped to the panel's width."""
    n_panels = len(panels)
    # Near square: 4 panels 2x2, 9 3x3, 16 4x4, then rows of 5.
    cols = max(1, min(5, math.ceil(math.sqrt(n_panels))))
    rows = math.ceil(n_panels / cols)
    title_lines = max(_wrap(p, _PANEL_W).count("\n") + 1 if p else 0 for p in panels)
    panel_h = _PANEL_H + 0.16 * title_lines
    fig, axes = plt.subplots(rows, cols, figsize=(_PANEL_W * cols + legend + 0.6, panel_h * rows + 1.0),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    shown_axes = list(axes.flat[:n_panels])
    if log_y:
        _log_y(shown_axes[0])  # shared: once is enough
    shown_axes[0].xaxis.set_major_locator(MaxNLocator(4, integer=True))
    for i, (ax, panel) in enumerate(zip(shown_axes, panels, strict=True)):
        ax.tick_params(labelsize=7, labelleft=i % cols == 0, labelbottom=i + cols >= n_panels)
        ax.set_title(_wrap(panel, _PANEL_W), fontsize=8)
    fig.supxlabel(xlabel, fontsize=8)
    fig.supylabel(ylabel, fontsize=8)
    return fig, shown_axes


def _colors(plan: Layout) -> dict[str, tuple]:
    """One color per line value, the same in every panel: a ramp for numbers, categories otherwise."""
    n = len(plan.lines)
    if _numeric(plan.lines):
        ramp = plt.get_cmap("viridis")
        return {line: ramp(0.9 * i / max(n - 1, 1)) for i, line in enumerate(plan.lines)}
    palette = plt.get_cmap("tab20" if n > 10 else "tab10")
    return {line: palette(i % 20) for i, line in enumerate(plan.lines)}


def _numeric(values: list[str]) -> bool:
    return len(values) > 1 and all(_sort_key(v)[0] == 0 for v in values)


def legend_lines(plan: Layout, data: pd.DataFrame) -> list[str]:
    """The line labels a figure draws, in the layout's order: a legend lists no line it lacks."""
    drawn = set(data["line"]) if len(data) else set()
    return [line for line in plan.lines if line in drawn]


def _legend_labels(plan: Layout, lines: list[str], extra: list | None) -> tuple[list, str]:
    return list(lines) + [label for _, label in extra or []], plan.line_key or "runs"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # Fast zlib level: a third of the encoding time for files ~20% larger.
    fig.savefig(buffer, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return buffer.getvalue()


def _setting_figure(plan: Layout, lines: list[str], extra: list | None, xlabel: str, ylabel: str,
                    panels: list[str] | None = None, log_y: bool = False):
    labels, legend_title = _legend_labels(plan, lines, extra)
    return _grid(plan.panels if panels is None else panels, xlabel, ylabel,
                 _legend_width(labels, legend_title), log_y=log_y)


def draw_loss(summary, plan: Layout, metrics_by_run=None):
    """The figure of loss curves per setting (returned open; `_png` makes it a file)."""
    curves = loss_curves(summary, plan)
    marks = divergences(summary, metrics_by_run).join(plan.runs[["panel", "line"]], on="run_dir")
    first = (summary.curves.groupby("run_dir")["loss"].first().to_numpy(dtype=float)
             if len(summary.curves) else np.array([]))
    low, high = loss_ylim(curves, first)
    colors = _colors(plan)
    lines = legend_lines(plan, pd.concat([curves[["line"]], marks[["line"]]]))
    extra = [(plt.Line2D([], [], color="black", ls="--", marker="X", ms=7, lw=1),
              "diverged (x: its first\nnon-finite step)")] if len(marks) else []
    fig, axes = _setting_figure(plan, lines, extra, "step", f"train/loss ({plan.per_setting})", log_y=True)
    dashed = set(zip(marks["panel"], marks["line"], strict=True))
    for ax, panel in zip(axes, plan.panels, strict=True):
        for line, frame in curves[curves["panel"] == panel].groupby("line", sort=False):
            ax.plot(frame["step"], frame["loss"].clip(upper=high * 0.999), color=colors[line], lw=1.2,
                    ls="--" if (panel, line) in dashed else "-", marker="o" if len(frame) == 1 else None, ms=4)
        x = marks[marks["panel"] == panel]
        if len(x):  # a loss above the range sits on the top edge
            ax.scatter(x["step"], x["loss"].fillna(high).clip(low, high / 4), **DIVERGED)
    axes[0].set_ylim(low, high)
    return fig, f"Loss per setting ({_runs(len(summary.runs))}; {plan.per_setting})", colors, lines, extra


def _cell_text(metric: str, value: float, diverged: int, runs: int) -> str:
    if diverged and diverged == runs:
        return "diverged"
    text = "" if not np.isfinite(value) else f"{value:.0%}" if metric == "converged" else f"{value:.2g}"
    return text + (f"\n{diverged}/{runs} div" if diverged else "")


def draw_heatmap(summary):
    """The heatmap figure (returned open)."""
    metric, data = heatmap_data(summary)
    row_key, col_key = data.attrs.get("row_key"), data.attrs.get("col_key")
    facets = sorted(data["facet"].unique(), key=_sort_key)
    rows = sorted(data["row"].unique(), key=_sort_key)
    cols = sorted(data["col"].unique(), key=_sort_key)
    row_labels, col_labels = [shown(r) for r in rows], [shown(c) for c in cols]
    values = data["value"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    seeds = _per_setting(data["runs"])
    if metric == "converged":
        norm, cmap, label = Normalize(0, 1), "viridis", "converged (share of runs)"
    else:
        positive = finite[finite > 0]
        norm = LogNorm(positive.min(), max(positive.max(), positive.min() * 10)) if len(positive) else Normalize(0, 1)
        cmap, label = "viridis_r", "final loss"
    n = max(len(facets), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    rotate = max(map(len, col_labels)) > 5
    col_label_h = _CHAR_W * max(map(len, col_labels)) * (0.5 if rotate else 0) + 0.2
    cell_w = max(0.75, _CHAR_W * 1.2 * max(len(c) for c in col_labels) if not rotate else 0.75)
    row_label_w = _CHAR_W * 0.9 * max(map(len, row_labels)) + 0.5
    facet_w = max(cell_w * len(cols) + row_label_w, _CHAR_W * max(map(len, facets)) + row_label_w, 2.4)
    facet_h = 0.45 * len(rows) + col_label_h + 0.9
    width, height = facet_w * ncols + 1.4, facet_h * nrows + 1.3
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    image, marks = None, set()
    cmap_obj = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
    for ax, facet in zip(axes.flat, facets, strict=False):
        grid = np.full((len(rows), len(cols)), np.nan)
        cells = data[data["facet"] == facet]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap_obj, norm=norm, aspect="auto")
        for r in cells.itertuples(index=False):
            grid[rows.index(r.row), cols.index(r.col)] = r.value
        image.set_data(np.ma.masked_invalid(grid))
        for r in cells.itertuples(index=False):
            i, j = rows.index(r.row), cols.index(r.col)
            every = r.diverged and r.diverged == r.runs
            if every:  # unmistakable: black, whatever the colour map
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="black", edgecolor="white", lw=1))
                marks.add("every")
            elif r.diverged:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="black",
                                           lw=0))
                marks.add("some")
            elif not np.isfinite(r.value):
                marks.add("none")
            if len(rows) * len(cols) <= 150:
                shade = ((0, 0, 0) if every else (1, 1, 1) if r.diverged  # on its white box
                         else image.cmap(image.norm(r.value)) if np.isfinite(r.value) else (0.87,) * 3)
                ax.text(j, i, _cell_text(metric, r.value, r.diverged, r.runs), ha="center", va="center",
                        fontsize=6.5, color="white" if sum(shade[:3]) < 1.5 else "black",
                        bbox=dict(facecolor="white", alpha=0.8, lw=0, pad=0.5) if r.diverged and not every else None)
        ax.set_xticks(range(len(cols)), col_labels, fontsize=7, rotation=30 if rotate else 0,
                      ha="right" if rotate else "center")
        ax.set_yticks(range(len(rows)), row_labels, fontsize=7)
        ax.set_xlabel(col_key or "", fontsize=8)
        ax.set_ylabel(row_key or "", fontsize=8)
        ax.set_title(facet, fontsize=8)
    if image is not None:
        bar = fig.colorbar(image, ax=[ax for ax in axes.flat[:n]], label=label, shrink=0.9, aspect=25)
        bar.ax.tick_params(labelsize=7)
        bar.ax.yaxis.label.set_fontsize(8)
        if metric != "converged":
            bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=8))
            bar.ax.yaxis.set_minor_formatter(NullFormatter())
            bar.ax.yaxis.set_major_formatter(_PLAIN)
    legend = {"every": Patch(facecolor="black", label="every run diverged"),
              "some": Patch(facecolor="white", edgecolor="black", hatch="///", label="some runs diverged (k/n div)"),
              "none": Patch(facecolor="#dddddd", label="no value")}
    handles = [legend[k] for k in ("every", "some", "none") if k in marks]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(_wrap(f"{label[0].upper()}{label[1:]} per setting ({_runs(len(summary.runs))}; {seeds})", width - 0.5),
                 fontsize=10)
    return fig


def draw_scatter(summary, key: str):
    """The final loss of each run against a continuous key (returned open)."""
    data = scatter_data(summary, key)
    groups = sorted(data["group"].unique(), key=_sort_key)
    palette = plt.get_cmap("tab10")
    labels = groups + (["diverged (no final loss)"] if data["diverged"].any() else [])
    fig, ax = plt.subplots(figsize=(6.0 + _legend_width(labels, "runs"), 4.2), layout="constrained")
    x = data["x"].to_numpy()
    if (x > 0).all() and x.max() >= 20 * x.min():
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_PLAIN)
        ax.xaxis.set_minor_formatter(NullFormatter())
    loss = data["final_loss"].to_numpy(dtype=float)
    if np.isfinite(loss).any() and (loss[np.isfinite(loss)] > 0).all():
        _log_y(ax)
    handles = []
    for i, group in enumerate(groups):
        part = data[(data["group"] == group) & data["final_loss"].notna()]
        handles.append(ax.scatter(part["x"], part["final_loss"], color=palette(i % 10), s=30, label=group))
    diverged = data[data["diverged"] | data["final_loss"].isna()]
    if len(diverged):  # at the top edge: a diverged run has no final loss to place it by
        handles.append(ax.scatter(diverged["x"], np.full(len(diverged), 0.97), transform=ax.get_xaxis_transform(),
                                  label="diverged (no final loss)", clip_on=False, **DIVERGED))
    ax.set_xlabel(key, fontsize=8)
    ax.set_ylabel("final loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    others = ", ".join(k for k in swept_keys(summary) if k != key) or "runs"
    fig.legend(handles=handles, title=others, loc="outside right center", fontsize=8, title_fontsize=8,
               frameon=False)
    fig.suptitle(f"Final loss of each run against {key} ({_runs(len(data))})", fontsize=10)
    return fig


def draw_dead(summary, plan: Layout, metrics_by_run):
    data = dead_fraction_curves(plan, metrics_by_run)
    if data.empty:
        return None
    colors = _colors(plan)
    lines = legend_lines(plan, data)
    panels = [p for p in plan.panels if p in set(data["panel"])]  # models without ReLUs have none
    fig, axes = _setting_figure(plan, lines, None, "step", "dead fraction of the worst ReLU layer", panels)
    for ax, panel in zip(axes, panels, strict=True):
        for line, frame in data[data["panel"] == panel].groupby("line", sort=False):
            ax.plot(frame["step"], frame["dead_fraction"], color=colors[line], lw=1.2)
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].set_yticks([0.0, 0.5, 1.0])
    return (fig, f"Dead ReLU units in each setting's worst layer ({plan.per_setting}, lightly smoothed; "
                 "1 = every unit of that layer dead)", colors, lines, None)


def draw_gradients(summary, plan: Layout, metrics_by_run):
    data = gradient_flow(plan, metrics_by_run)
    deep = data.groupby("panel")["depth"].transform("max") > 0
    data = data[deep]  # one weight layer has no flow to show
    if data.empty:
        return None
    colors = _colors(plan)
    lines = legend_lines(plan, data)
    values = data[["norm", "low", "high"]].to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    floor = positive.min() / 3 if len(positive) else 1e-12
    names = data.groupby("depth")["param"].agg(lambda p: p.iloc[0] if p.nunique() == 1 else None)
    same = names.notna().all() and len(names) <= 8
    zero = bool((data["norm"] <= 0).any())
    extra = [(plt.Line2D([], [], color="grey", marker="v", ls=""), "zero gradient")] if zero else []
    panels = [p for p in plan.panels if p in set(data["panel"])]
    fig, axes = _setting_figure(plan, lines, extra, "weight parameter, input -> output" if same
                                else "weight layer (0 = input)", "gradient norm", panels, log_y=True)
    for ax, panel in zip(axes, panels, strict=True):
        for line, frame in data[data["panel"] == panel].groupby("line", sort=False):
            norm = frame["norm"].to_numpy(dtype=float)
            ax.fill_between(frame["depth"], frame["low"].clip(lower=floor), frame["high"].clip(lower=floor),
                            color=colors[line], alpha=0.12, lw=0)
            ax.plot(frame["depth"], np.where(norm > 0, norm, np.nan), color=colors[line], lw=1.2, marker=".", ms=4)
            at_zero = frame["depth"][norm <= 0]
            if len(at_zero):
                ax.scatter(at_zero, np.full(len(at_zero), floor), marker="v", color=colors[line], s=18, zorder=5)
    axes[0].set_ylim(bottom=floor / 1.5)
    if same:
        axes[0].set_xticks(names.index, names.to_list())
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=30)
    return (fig, f"Gradient norm per weight layer (median over steps, {plan.per_setting}; band: 10-90%); "
                 "falling toward the input = vanishing", colors, lines, extra)


def figures(summary, metrics_by_run: Mapping | None = None) -> dict:
    """{file name: open matplotlib figure}, each finished (title, legend) and ready to save."""
    plan = layout(summary)
    if metrics_by_run:  # each run's curves sorted once, for all the figures
        metrics_by_run = {run_dir: _curves(metrics) for run_dir, metrics in metrics_by_run.items()}
    drawn = {REPORT_PNG: draw_loss(summary, plan, metrics_by_run)}
    key = continuous_key(summary)
    drawn[SCATTER_PNG if key else HEATMAP_PNG] = draw_scatter(summary, key) if key else draw_heatmap(summary)
    if metrics_by_run:
        drawn[DEAD_PNG] = draw_dead(summary, plan, metrics_by_run)
        drawn[GRADIENTS_PNG] = draw_gradients(summary, plan, metrics_by_run)
    finished = {}
    for name, item in drawn.items():
        if item is None:
            continue
        if isinstance(item, tuple):  # small multiples: the legend and title go on last
            fig, title, colors, lines, extra = item
            handles = [plt.Line2D([], [], color=colors[line], lw=2) for line in lines] + [h for h, _ in extra or []]
            labels, legend_title = _legend_labels(plan, lines, extra)
            fig.legend(handles, labels, title=legend_title, loc="outside right center", fontsize=8,
                       title_fontsize=8, frameon=False)
            fig.suptitle(_wrap(title, fig.get_figwidth() - 0.5), fontsize=10)
            item = fig
        finished[name] = item
    return finished


def render_reports(summary, metrics_by_run: Mapping[str, pd.DataFrame] | None = None) -> dict[str, bytes]:
    """{file name: PNG bytes}. `metrics_by_run`: run_dir (as in `summary.runs`) -> its
    `read_metrics(run_dir, keep=findings.diagnosis_tag)` frame (or `findings.Curves` of it);
    without it only the loss figure and the heatmap (or scatter) are drawn."""
    return {name: _png(fig) for name, fig in figures(summary, metrics_by_run).items()}
