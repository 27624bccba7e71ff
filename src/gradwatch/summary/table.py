"""The sweep summary: one row per run, a grouped view over seeds, written as CSV, Markdown and PNG.

Reads each run's `run.json` and its parquet metrics (never the TensorBoard events: see
scripts/bench_summary.py). Runs that cannot be read are listed, never crash the summary.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradwatch.config.cli import CONF_DIR
from gradwatch.config.overrides import override_values
from gradwatch.storage.files import write_atomic
from gradwatch.storage.parquet import read_scalars
from gradwatch.storage.paths import RunPaths
from gradwatch.storage.record import read_run
from gradwatch.summary.outcome import Outcome, natural_key, outcome_of, outcome_tag
from gradwatch.telemetry import tags

# The summary's columns, in order (DESIGN.md, "Summary table"): swept keys go after `status`,
# the outcome's fields after `seed`, per-layer dead fractions after `dead_fraction_max`.
LEAD_COLUMNS = ["run_dir", "status"]
_OUTCOME = Outcome.names()
_SPLIT = _OUTCOME.index("dead_fraction_max") + 1
RESULT_COLUMNS = ["seed", *_OUTCOME[:_SPLIT]]
TAIL_COLUMNS = [*_OUTCOME[_SPLIT:], "wall_s", "error"]
GROUPED_METRICS = ["final_loss", "min_loss", "steps_to_converge", "converged", "diverged",
                   "dead_fraction_final", "dead_fraction_max", "wall_s"]
NOT_SWEPT = {"seed", "ckpt_path"}

CSV_FILE, MARKDOWN_FILE, REPORT_FILE = "summary.csv", "summary.md", "report.png"


@dataclass
class Summary:
    runs: pd.DataFrame
    grouped: pd.DataFrame
    swept: list[str]
    curves: pd.DataFrame  # run_dir, step, loss: the loss curve of every run
    fixed: dict = field(default_factory=dict)  # overrides every run shares
    unreadable: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return self.runs.loc[self.runs["status"].isin(["failed", "interrupted"]), "run_dir"].tolist()


def configured_thresholds(path: Path) -> tuple[float | None, bool | None]:
    """`summary.converge_below` and `summary.converge_relative` from a config file (a run's
    .hydra/config.yaml, a sweep's multirun.yaml, conf/train.yaml); None for what it does not say."""
    try:
        summary = OmegaConf.load(path).get("summary") or {}
        below, relative = summary.get("converge_below"), summary.get("converge_relative")
        return (None if below is None else float(below)), (None if relative is None else bool(relative))
    except (OSError, ValueError, TypeError, AttributeError, OmegaConfBaseException):
        return None, None


def default_thresholds(conf_dir: Path = CONF_DIR) -> tuple[float, bool]:
    """The defaults of conf/train.yaml, the one place they are set (for folders without a config)."""
    below, relative = configured_thresholds(Path(conf_dir) / "train.yaml")
    return (math.nan if below is None else below), bool(relative)


def _first_set(*values):
    return next(v for v in values if v is not None)


def find_runs(folder: Path) -> list[Path]:
    """Run folders under `folder` (itself included): those with a run.json, metrics or .hydra."""
    folder = Path(folder)
    marks = [RunPaths.RECORD, RunPaths.METRICS, RunPaths.HYDRA]
    found = {p.parent for mark in marks for p in folder.rglob(mark) if RunPaths.HYDRA not in p.parent.parts}
    return sorted(found, key=lambda p: (len(p.parts), _run_number(p), str(p)))


def _run_number(path: Path) -> int:
    head = path.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _load(path: Path):
    try:
        return OmegaConf.load(path) if path.is_file() else None
    except (OSError, ValueError, OmegaConfBaseException):
        return None


def swept_values(record: dict, paths: RunPaths) -> dict:
    """The value of each overridden key in this run: a group's choice by name (`.hydra/hydra.yaml`),
    any other key from the resolved `.hydra/config.yaml`, else as typed."""
    items = record.get("overrides")
    if not isinstance(items, list):
        loaded = _load(paths.overrides)
        items = list(loaded) if loaded is not None else []
    hydra_node = _load(paths.hydra_config)
    choices = OmegaConf.select(hydra_node, "hydra.runtime.choices", default=None) if hydra_node else None
    try:
        return override_values(items, _load(paths.config), choices)
    except Exception:  # noqa: BLE001 - overrides Hydra cannot parse: no swept values for this run
        return {}


def summarize_run(run_dir: Path, root: Path, converge_below: float | None = None, relative: bool | None = None,
                  fallback: tuple[float | None, bool | None] = (None, None)):
    """One row of the summary and the run's loss curve; problems go into the row's `error`.

    The convergence threshold is `converge_below`/`relative` where given, else the run's own
    config, else `fallback` (the sweep's, then conf/train.yaml's).
    """
    paths = RunPaths(run_dir)
    own_below, own_relative = configured_thresholds(paths.config)
    converge_below = _first_set(converge_below, own_below, fallback[0])
    relative = _first_set(relative, own_relative, fallback[1])
    row: dict = {"run_dir": str(run_dir.relative_to(root)) if run_dir != root else ".", "status": "unknown"}
    problems = []
    record: dict = {}
    try:
        record = read_run(run_dir)
        row["status"] = record.get("status", "unknown")
        row["error"] = record.get("error")
        row["wall_s"] = record.get("wall_s")
    except FileNotFoundError:
        problems.append("no run.json")
    except (OSError, ValueError) as err:
        problems.append(f"run.json unreadable ({err})")
    row["overrides"] = swept_values(record, paths)
    row["seed"] = record.get("seed", row["overrides"].get("seed"))

    scalars = read_scalars(run_dir, keep=outcome_tag)
    outcome = outcome_of(scalars, converge_below, relative)
    problems += [f"metrics {p}" for p in scalars.unreadable]
    if row["status"] == "diverged" and not outcome.diverged:
        outcome.diverged, outcome.converged = True, False
    row.update(outcome.row())
    if not record and not outcome.steps:
        row["status"] = "unreadable"
    if problems:
        row["error"] = "; ".join(filter(None, [row.get("error"), *problems]))
    steps, losses = scalars.series(tags.LOSS)
    return row, pd.DataFrame({"run_dir": row["run_dir"], "step": steps, "loss": losses})


def grouped_view(runs: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """Mean and std over seeds for each setting of the swept keys."""
    keys = [k for k in swept if k in runs.columns]
    metrics = [m for m in GROUPED_METRICS if m in runs.columns]
    numeric = runs[keys + metrics].copy()
    for column in ("converged", "diverged"):
        numeric[column] = numeric[column].astype(float)
    if not keys:
        numeric["setting"] = "all"
        keys = ["setting"]
    grouped = numeric.groupby(keys, dropna=False, sort=True)[metrics].agg(["mean", "std"])
    grouped.columns = [f"{m}_{stat}" for m, stat in grouped.columns]
    grouped.insert(0, "runs", numeric.groupby(keys, dropna=False, sort=True).size())
    return grouped.reset_index()


def summarize(folder: Path, converge_below: float | None = None, relative: bool | None = None) -> Summary:
    """The summary of every run under `folder`; thresholds as in `summarize_run`."""
    folder = Path(folder)
    sweep_below, sweep_relative = configured_thresholds(folder / "multirun.yaml")
    default_below, default_relative = default_thresholds()
    fallback = (_first_set(sweep_below, default_below), _first_set(sweep_relative, default_relative))
    rows, curves, unreadable = [], [], []
    for run_dir in find_runs(folder):
        row, curve = summarize_run(run_dir, folder, converge_below, relative, fallback)
        rows.append(row)
        curves.append(curve)
        if row["status"] == "unreadable" or "unreadable" in str(row.get("error") or "") \
                or "metrics part-" in str(row.get("error") or ""):
            unreadable.append(row["run_dir"])
    overrides = [row.pop("overrides") for row in rows]
    all_keys = sorted({k for o in overrides for k in o} - NOT_SWEPT)
    # Swept keys are those whose value differs between runs (all of them for a single run).
    keys = [k for k in all_keys if len(rows) < 2 or len({repr(o.get(k)) for o in overrides}) > 1]
    fixed = {k: overrides[0].get(k) for k in all_keys if k not in keys}
    for row, o in zip(rows, overrides, strict=True):
        row.update({k: o.get(k) for k in keys})
    runs = pd.DataFrame(rows)
    layer_columns = sorted((c for c in runs.columns if c.startswith("dead_fraction_") and "/" in c), key=natural_key)
    columns = LEAD_COLUMNS + keys + RESULT_COLUMNS + layer_columns + TAIL_COLUMNS
    runs = runs.reindex(columns=columns)
    curve_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["run_dir", "step", "loss"])
    grouped = grouped_view(runs, keys) if len(runs) else pd.DataFrame()
    return Summary(runs, grouped, keys, curve_frame, fixed, unreadable)


def _mean_std(grouped: pd.DataFrame, metric: str) -> pd.Series:
    mean, std = grouped[f"{metric}_mean"], grouped[f"{metric}_std"]
    text = ["-" if pd.isna(m) else f"{m:.4g}" if pd.isna(s) else f"{m:.4g} ± {s:.2g}"
            for m, s in zip(mean, std, strict=True)]
    return pd.Series(text, index=grouped.index)


def readable_grouped(summary: Summary) -> pd.DataFrame:
    """The grouped view for people: `mean ± std` per metric, rates for converged/diverged."""
    grouped = summary.grouped
    keys = [c for c in grouped.columns if c in summary.swept or c == "setting"]
    table = grouped[keys + ["runs"]].copy()
    for metric in ("final_loss", "min_loss", "steps_to_converge", "dead_fraction_final", "dead_fraction_max"):
        if f"{metric}_mean" in grouped:
            table[metric] = _mean_std(grouped, metric)
    for rate in ("converged", "diverged"):
        if f"{rate}_mean" in grouped:
            table[rate] = [f"{v:.0%}" for v in grouped[f"{rate}_mean"]]
    return table


def to_markdown(summary: Summary, folder: Path) -> str:
    lines = [f"# Sweep summary: {folder}", "",
             f"{len(summary.runs)} runs; swept: {', '.join(summary.swept) or 'nothing'}; "
             f"fixed: {', '.join(f'{k}={v}' for k, v in summary.fixed.items()) or 'nothing'}.", ""]
    if summary.unreadable:
        lines += [f"Unreadable: {', '.join(summary.unreadable)}", ""]
    lines += ["## Per setting (mean and std over seeds)", "",
              readable_grouped(summary).to_markdown(index=False) if len(summary.grouped) else "(none)", "",
              "## Per run", "", summary.runs.drop(columns=["error"]).to_markdown(index=False, floatfmt=".6g"), ""]
    return "\n".join(lines)


def write_summary(folder: Path, converge_below: float | None = None, relative: bool | None = None) -> Summary:
    """Write summary.csv, summary.md and report.png into `folder`; each file atomically."""
    from gradwatch.summary.report import render_report

    folder = Path(folder)
    summary = summarize(folder, converge_below, relative)
    write_atomic(folder / CSV_FILE, summary.runs.to_csv(index=False).encode())
    write_atomic(folder / MARKDOWN_FILE, to_markdown(summary, folder).encode())
    write_atomic(folder / REPORT_FILE, render_report(summary))
    return summary
