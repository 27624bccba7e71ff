"""The report people look at: PNG files in the sweep (or run) folder.

    report.png            loss curves per setting; diverged runs marked, never stretching the axis
    report_heatmap.png    the main metric (convergence rate, else final loss) over the two swept
                          keys with most values, one heatmap per value of the other keys
    report_dead.png       dead ReLU fraction over steps per setting (when the runs have ReLUs)
    report_gradients.png  gradient norm per layer, input to output (vanishing shows as a slope)

Settings share one layout: the swept key with most values (at most MAX_LINES) is the line in a
panel, the other keys make the panels (small multiples), so 48 runs and 200 read the same way.
Each figure's data comes from a function returning a DataFrame (tested); drawing is separate.

    >>> pngs = render_reports(summary, metrics_by_run)   # doctest: +SKIP
    >>> sorted(pngs)                                      # doctest: +SKIP
    ['report.png', 'report_dead.png', 'report_gradients.png', 'report_heatmap.png']
"""

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator  # noqa: E402

from gradwatch.summary.findings import Curves, divergence  # noqa: E402
from gradwatch.telemetry import tags  # noqa: E402

REPORT_FILE, HEATMAP_FILE, DEAD_FILE, GRADIENTS_FILE = (
    "report.png", "report_heatmap.png", "report_dead.png", "report_gradients.png")
MAX_LINES = 12  # lines a panel can hold and still be told apart
MAX_POINTS = 400  # points per curve: enough for the eye, cheap to draw at 200 runs
SMOOTH = 40  # dead fractions: rolling mean over 1/SMOOTH of a run's logged steps
_PANEL_W, _PANEL_H, _DPI = 3.4, 2.5, 90


# --- layout: which setting goes to which panel and line ---------------------------------------

@dataclass
class Layout:
    """`runs`: per run_dir its `panel` title and `line` label; `lines`: line labels in order
    (one color each, shared by every panel); `panels`: panel titles in order."""

    runs: pd.DataFrame
    line_key: str | None
    panels: list[str]
    lines: list[str]


def _sort_key(value) -> tuple:
    """Numbers by value, lists (`[16,16]`) by length then items, text in natural number order."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        text = str(value)
        parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]
        return (1, float(text.count(",")) if text.startswith("[") else 0.0, parts)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def swept_keys(summary) -> list[str]:
    """Swept keys present in the runs table, most values first (ties keep the sweep's order)."""
    keys = [k for k in summary.swept if k in summary.runs.columns]
    counts = {k: summary.runs[k].astype(str).nunique() for k in keys}
    return sorted(keys, key=lambda k: -counts[k])


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
    frame["line"] = runs[line_key].astype(str).to_numpy() if line_key else "all runs"
    label = [", ".join(f"{_short(k)}={v}" for k, v in zip(facets, row, strict=True))
             for row in runs[facets].astype(str).itertuples(index=False)] if facets else [""] * len(runs)
    frame["panel"] = label
    lines = sorted(frame["line"].unique(), key=_sort_key) if line_key else ["all runs"]
    if len(lines) > MAX_LINES:  # one key with many values: chunks of MAX_LINES lines, one panel each
        chunk = {line: i // MAX_LINES for i, line in enumerate(lines)}
        n = math.ceil(len(lines) / MAX_LINES)
        frame["panel"] = [f"{p}{', ' if p else ''}{_short(line_key)} part {chunk[v] + 1}/{n}"
                          for p, v in zip(frame["panel"], frame["line"], strict=True)]
    order = {p: _panel_sort(p, runs, facets, frame) for p in frame["panel"].unique()}
    panels = sorted(order, key=order.get)
    return Layout(frame.set_index("run_dir"), line_key, panels, lines)


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
    """Median over the seeds of each setting, per `on`; non-finite values do not count."""
    if per_run.empty:
        return pd.DataFrame(columns=["panel", "line", on, value])
    frame = per_run.join(plan.runs[["panel", "line"]], on="run_dir")
    frame[value] = frame[value].where(np.isfinite(frame[value].to_numpy(dtype=float)))
    return frame.groupby(["panel", "line", on], sort=False)[value].median().reset_index()


def loss_curves(summary, plan: Layout) -> pd.DataFrame:
    """panel, line, step, loss: the median loss over seeds per setting (finite values only)."""
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
    """A log-scale y-range a diverged run does not stretch: from the 1st percentile of the
    positive plotted losses to 10x the largest step-0 loss (a loss above where it started has
    gone wrong; its line leaves the top and its marker sits on the edge)."""
    values = curves["loss"].to_numpy(dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    starts = first_losses[np.isfinite(first_losses) & (first_losses > 0)]
    if not len(values):
        return 1e-3, 1.0
    top = 10 * float(starts.max()) if len(starts) else float(np.percentile(values, 99)) * 2
    bottom = float(np.percentile(values, 1)) / 2
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
    other keys. Convergence is a rate over seeds; final loss the median over seeds (a diverged
    run's is left out; `diverged` counts them)."""
    runs = summary.runs.copy()
    metric = main_metric(summary)
    keys = swept_keys(summary)
    row_key, col_key = (keys + [None, None])[:2]
    facets = keys[2:]
    runs["row"] = runs[row_key].astype(str) if row_key else ""
    runs["col"] = runs[col_key].astype(str) if col_key else ""
    runs["facet"] = [", ".join(f"{_short(k)}={v}" for k, v in zip(facets, r, strict=True))
                     for r in runs[facets].astype(str).itertuples(index=False)] if facets else ""
    diverged = runs["diverged"].fillna(False).astype(bool) if "diverged" in runs else pd.Series(False, index=runs.index)
    runs["diverged"] = diverged
    if metric == "converged":
        runs["value"] = runs["converged"].astype(float)
        agg = "mean"
    else:
        runs["value"] = pd.to_numeric(runs["final_loss"], errors="coerce").where(~diverged)
        runs["value"] = runs["value"].where(np.isfinite(runs["value"]))
        agg = "median"
    grouped = runs.groupby(["facet", "row", "col"], sort=False).agg(
        value=("value", agg), runs=("value", "size"), diverged=("diverged", "sum")).reset_index()
    grouped.attrs.update(row_key=row_key, col_key=col_key)
    return metric, grouped


def dead_fraction_curves(plan: Layout, metrics_by_run: Mapping) -> pd.DataFrame:
    """panel, line, step, dead_fraction: the mean dead fraction over a run's ReLU layers per
    step (a rolling mean over 1/SMOOTH of its steps), median over the seeds of each setting;
    empty when no run has ReLU layers."""
    parts = []
    for run_dir, metrics in metrics_by_run.items():
        curves = _curves(metrics)
        layers = curves.layers()
        if run_dir not in plan.runs.index or not layers:
            continue
        series = [curves.get(tags.act(layer, "dead_fraction")) for layer in layers]
        steps = series[0][0]
        if all(np.array_equal(s, steps) for s, _ in series):
            mean = np.mean([v for _, v in series], axis=0)
        else:  # layers logged on different steps: align by step
            mean = pd.concat([pd.Series(v, index=s) for s, v in series], axis=1).mean(axis=1)
            steps, mean = mean.index.to_numpy(), mean.to_numpy()
        # A per-batch fraction flickers (a unit silent on one batch): a short rolling mean shows the trend.
        window = max(1, round(len(mean) / SMOOTH))
        mean = pd.Series(mean).rolling(window, center=True, min_periods=1).mean().to_numpy()
        keep = _thin(steps)
        parts.append(pd.DataFrame({"run_dir": run_dir, "step": steps[keep], "dead_fraction": mean[keep]}))
    if not parts:
        return pd.DataFrame(columns=["panel", "line", "step", "dead_fraction"])
    return _by_setting(pd.concat(parts, ignore_index=True), plan, "dead_fraction")


def gradient_flow(plan: Layout, metrics_by_run: Mapping) -> pd.DataFrame:
    """panel, line, depth, param, norm, low, high: per weight parameter in network order
    (depth 0 = the input layer), the median gradient norm over a run's steps before any
    divergence, and its 10th-90th percentile over steps; then the median (and the widest band)
    over the seeds of each setting."""
    rows = []
    for run_dir, metrics in metrics_by_run.items():
        if run_dir not in plan.runs.index:
            continue
        curves = _curves(metrics)
        found = divergence(curves)
        end = None if found is None else found.step
        weights = [p for p in curves.params() if p.endswith("weight")]
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
        param=("param", "first"), norm=("norm", "median"), low=("low", "min"), high=("high", "max")).reset_index()


# --- drawing --------------------------------------------------------------------------------------

# Few ticks and plain tick labels: tick artists and mathtext are most of matplotlib's time here.
_PLAIN = FuncFormatter(lambda v, _: f"{v:g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.0e}")
_LEGEND_W = 1.9  # inches right of the panels for the legend


def _log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=5))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(_PLAIN)


def _grid(n_panels: int, xlabel: str, ylabel: str, log_y: bool = False):
    """A figure of small multiples sharing both axes; tick labels on the outer panels only."""
    cols = max(1, min(n_panels, 5 if n_panels > 16 else 4 if n_panels > 6 else 3 if n_panels > 4 else n_panels))
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(_PANEL_W * cols + _LEGEND_W, _PANEL_H * rows + 0.9),
                             squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    shown = list(axes.flat[:n_panels])
    if log_y:
        _log_y(shown[0])  # shared: once is enough
    shown[0].xaxis.set_major_locator(MaxNLocator(4, integer=True))
    for i, ax in enumerate(shown):
        ax.tick_params(labelsize=7, labelleft=i % cols == 0, labelbottom=i + cols >= n_panels)
    fig.supxlabel(xlabel, fontsize=8, y=0.02)
    fig.supylabel(ylabel, fontsize=8, x=0.02 * 6 / fig.get_figwidth())
    return fig, shown


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


def _finish(fig, plan: Layout, colors: dict, title: str, extra: list | None = None) -> bytes:
    """Title, one legend right of the panels (line key values, then `extra` handles), PNG bytes."""
    handles = [plt.Line2D([], [], color=colors[line], lw=2) for line in plan.lines] + [h for h, _ in extra or []]
    labels = list(plan.lines) + [label for _, label in extra or []]
    width, height = fig.get_size_inches()
    fig.legend(handles, labels, title=plan.line_key or "runs", loc="center left",
               bbox_to_anchor=(1 - (_LEGEND_W - 0.1) / width, 0.5), fontsize=8, title_fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.95 / width, right=1 - _LEGEND_W / width, top=1 - 0.6 / height,
                        bottom=0.75 / height, wspace=0.08, hspace=0.35)
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # Fast zlib level: a third of the encoding time for files ~20% larger.
    fig.savefig(buffer, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return buffer.getvalue()


def draw_loss(summary, plan: Layout, metrics_by_run=None) -> bytes:
    curves = loss_curves(summary, plan)
    marks = divergences(summary, metrics_by_run).join(plan.runs[["panel", "line"]], on="run_dir")
    first = (summary.curves.groupby("run_dir")["loss"].first().to_numpy(dtype=float)
             if len(summary.curves) else np.array([]))
    low, high = loss_ylim(curves, first)
    colors = _colors(plan)
    fig, axes = _grid(len(plan.panels), "step", "train/loss (median over seeds)", log_y=True)
    dashed = set(zip(marks["panel"], marks["line"], strict=True))
    for ax, panel in zip(axes, plan.panels, strict=True):
        for line, frame in curves[curves["panel"] == panel].groupby("line", sort=False):
            ax.plot(frame["step"], frame["loss"].clip(upper=high * 0.999), color=colors[line], lw=1.2,
                    ls="--" if (panel, line) in dashed else "-")
        x = marks[marks["panel"] == panel]
        if len(x):
            # Above the range: on the top edge, drawn over it.
            ax.scatter(x["step"], x["loss"].fillna(high).clip(low, high / 1.6), marker="x", s=40,
                       color=[colors[v] for v in x["line"]], zorder=5, linewidths=1.8, clip_on=False)
        ax.set_title(panel, fontsize=8)
    axes[0].set_ylim(low, high)
    diverged = (plt.Line2D([], [], color="k", ls="--", marker="x", lw=1), "diverged\n(x: first non-finite\nstep)")
    return _finish(fig, plan, colors, f"Loss per setting ({len(summary.runs)} runs)", [diverged] if len(marks) else [])


def draw_heatmap(summary) -> bytes:
    metric, data = heatmap_data(summary)
    row_key, col_key = data.attrs.get("row_key"), data.attrs.get("col_key")
    facets = sorted(data["facet"].unique(), key=_sort_key)
    rows = sorted(data["row"].unique(), key=_sort_key)
    cols = sorted(data["col"].unique(), key=_sort_key)
    values = data["value"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if metric == "converged":
        norm, cmap, label = Normalize(0, 1), "viridis", "convergence rate (share of seeds)"
    else:
        positive = finite[finite > 0]
        norm = LogNorm(positive.min(), max(positive.max(), positive.min() * 10)) if len(positive) else Normalize(0, 1)
        cmap, label = "viridis_r", "final loss (median over seeds)"
    n = max(len(facets), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    cell_w, cell_h = max(2.4, 0.62 * len(cols) + 0.9), max(1.6, 0.42 * len(rows) + 0.9)
    width, height = cell_w * ncols + 1.6, cell_h * nrows + 0.8
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    image = None
    for ax, facet in zip(axes.flat, facets, strict=False):
        grid = np.full((len(rows), len(cols)), np.nan)
        text = np.full((len(rows), len(cols)), "", dtype=object)
        for r in data[data["facet"] == facet].itertuples(index=False):
            i, j = rows.index(r.row), cols.index(r.col)
            grid[i, j] = r.value
            shown = "-" if not np.isfinite(r.value) else f"{r.value:.0%}" if metric == "converged" else f"{r.value:.2g}"
            text[i, j] = shown + (f"\n{r.diverged}/{r.runs} div" if r.diverged else "")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        ax.set_facecolor("#dddddd")
        if len(rows) * len(cols) <= 150:
            for i in range(len(rows)):
                for j in range(len(cols)):
                    shade = image.cmap(image.norm(grid[i, j])) if np.isfinite(grid[i, j]) else (0.87,) * 3
                    ax.text(j, i, text[i, j], ha="center", va="center", fontsize=6.5,
                            color="white" if sum(shade[:3]) < 1.5 else "black")
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=30 if max(map(len, cols)) > 5 else 0)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(col_key or "", fontsize=8)
        ax.set_ylabel(row_key or "", fontsize=8)
        ax.set_title(facet, fontsize=8)
    fig.subplots_adjust(left=1.1 / width, right=1 - 1.3 / width, top=1 - 0.6 / height, bottom=0.75 / height,
                        wspace=0.5, hspace=0.6)
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_axes((1 - 1.0 / width, 0.2, 0.15 / width, 0.6)), label=label)
        bar.ax.yaxis.set_major_formatter(_PLAIN)
        bar.ax.yaxis.set_minor_formatter(_PLAIN if metric != "converged" else bar.ax.yaxis.get_minor_formatter())
    fig.suptitle(f"{label} ({len(summary.runs)} runs; grey: no value; 'div': diverged runs)", fontsize=10)
    return _png(fig)


def draw_dead(summary, plan: Layout, metrics_by_run) -> bytes | None:
    data = dead_fraction_curves(plan, metrics_by_run)
    if data.empty:
        return None
    colors = _colors(plan)
    panels = [p for p in plan.panels if p in set(data["panel"])]  # models without ReLUs have none
    fig, axes = _grid(len(panels), "step", "dead fraction (mean over ReLU layers)")
    for ax, panel in zip(axes, panels, strict=True):
        for line, frame in data[data["panel"] == panel].groupby("line", sort=False):
            ax.plot(frame["step"], frame["dead_fraction"], color=colors[line], lw=1.2)
        ax.set_title(panel, fontsize=8)
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].yaxis.set_major_locator(MaxNLocator(3))
    return _finish(fig, plan, colors,
                   "Dead ReLU units per setting (median over seeds, lightly smoothed; 1 = every unit dead)")


def draw_gradients(summary, plan: Layout, metrics_by_run) -> bytes | None:
    data = gradient_flow(plan, metrics_by_run)
    deep = data.groupby("panel")["depth"].transform("max") > 0
    data = data[deep]  # one weight layer has no flow to show
    if data.empty:
        return None
    colors = _colors(plan)
    values = data[["norm", "low", "high"]].to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    floor = positive.min() / 3 if len(positive) else 1e-12
    names = data.groupby("depth")["param"].agg(lambda p: p.iloc[0] if p.nunique() == 1 else None)
    same = names.notna().all() and len(names) <= 8
    panels = [p for p in plan.panels if p in set(data["panel"])]
    fig, axes = _grid(len(panels), "weight parameter, input -> output" if same else "weight layer (0 = input)",
                      "gradient norm", log_y=True)
    zero = False
    for ax, panel in zip(axes, panels, strict=True):
        for line, frame in data[data["panel"] == panel].groupby("line", sort=False):
            norm = frame["norm"].to_numpy(dtype=float)
            ax.fill_between(frame["depth"], frame["low"].clip(lower=floor), frame["high"].clip(lower=floor),
                            color=colors[line], alpha=0.12, lw=0)
            ax.plot(frame["depth"], np.where(norm > 0, norm, np.nan), color=colors[line], lw=1.2, marker=".", ms=4)
            at_zero = frame["depth"][norm <= 0]
            if len(at_zero):
                zero = True
                ax.scatter(at_zero, np.full(len(at_zero), floor), marker="v", color=colors[line], s=18, zorder=5)
        ax.set_title(panel, fontsize=8)
    axes[0].set_ylim(bottom=floor / 1.5)
    if same:
        axes[0].set_xticks(names.index, names.to_list())
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=30)
    extra = [(plt.Line2D([], [], color="grey", marker="v", ls=""), "zero gradient")] if zero else []
    return _finish(fig, plan, colors, "Gradient norm per weight layer (median over steps, band: 10-90%); "
                                      "falling toward the input = vanishing", extra)


def render_reports(summary, metrics_by_run: Mapping[str, pd.DataFrame] | None = None) -> dict[str, bytes]:
    """{file name: PNG bytes}. `metrics_by_run`: run_dir (as in `summary.runs`) -> its
    `read_metrics(run_dir, keep=findings.diagnosis_tag)` frame (or `findings.Curves` of it);
    without it only the loss figure and the heatmap are drawn."""
    plan = layout(summary)
    if metrics_by_run:  # each run's curves sorted once, for all the figures
        metrics_by_run = {run_dir: _curves(metrics) for run_dir, metrics in metrics_by_run.items()}
    pngs = {REPORT_FILE: draw_loss(summary, plan, metrics_by_run), HEATMAP_FILE: draw_heatmap(summary)}
    if metrics_by_run:
        for name, png in ((DEAD_FILE, draw_dead(summary, plan, metrics_by_run)),
                          (GRADIENTS_FILE, draw_gradients(summary, plan, metrics_by_run))):
            if png is not None:
                pngs[name] = png
    return pngs


def render_report(summary, metrics_by_run: Mapping[str, pd.DataFrame] | None = None) -> bytes:
    """report.png alone (the loss curves per setting), as before."""
    return draw_loss(summary, layout(summary), metrics_by_run)
