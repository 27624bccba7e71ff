"""The sweep summary: one row per run, a grouped view over seeds, written as CSV, Markdown and PNG.

Reads each run's `run.json` and its parquet metrics (never the TensorBoard events: see
scripts/bench_summary.py). Runs that cannot be read are listed, never crash the summary.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradwatch.config.cli import split_override
from gradwatch.storage.files import write_atomic
from gradwatch.storage.parquet import METRICS_DIR, Scalars, read_scalars
from gradwatch.storage.record import RUN_FILE
from gradwatch.summary.outcome import steps_to_converge
from gradwatch.telemetry import tags

# The summary's columns, in order (DESIGN.md, "Summary table"); swept keys go after `status`
# and per-layer dead fractions after `dead_fraction_max`.
LEAD_COLUMNS = ["run_dir", "status"]
RESULT_COLUMNS = ["seed", "steps", "final_loss", "min_loss", "steps_to_converge", "converged", "diverged",
                  "dead_fraction_final", "dead_fraction_max"]
TAIL_COLUMNS = ["grad_global_norm_final", "wall_s", "error"]
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


DEFAULT_CONVERGE_BELOW = 1e-3


def configured_thresholds(path: Path) -> tuple[float | None, bool | None]:
    """`summary.converge_below` and `summary.converge_relative` from a config file (a run's
    .hydra/config.yaml, a sweep's multirun.yaml); None for what it does not say."""
    try:
        summary = OmegaConf.load(path).get("summary") or {}
        below, relative = summary.get("converge_below"), summary.get("converge_relative")
        return (None if below is None else float(below)), (None if relative is None else bool(relative))
    except (OSError, ValueError, TypeError, AttributeError, OmegaConfBaseException):
        return None, None


def _first_set(*values):
    return next(v for v in values if v is not None)


def find_runs(folder: Path) -> list[Path]:
    """Run folders under `folder` (itself included): those with a run.json, metrics or .hydra."""
    folder = Path(folder)
    marks = [RUN_FILE, METRICS_DIR, ".hydra"]
    found = {p.parent for mark in marks for p in folder.rglob(mark) if ".hydra" not in p.parent.parts}
    return sorted(found, key=lambda p: (len(p.parts), _run_number(p), str(p)))


def _run_number(path: Path) -> int:
    head = path.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _parse_value(text: str):
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def _overrides(record: dict, run_dir: Path) -> dict:
    items = record.get("overrides")
    if items is None:
        path = run_dir / ".hydra" / "overrides.yaml"
        lines = path.read_text().splitlines() if path.exists() else []
        items = [line.strip()[2:] for line in lines if line.startswith("- ")]
    return {key: _parse_value(value) for key, value in filter(None, map(split_override, items))}


def _summary_tag(tag: str) -> bool:
    """The tags a summary row is made of."""
    return tag in (tags.LOSS, tags.GLOBAL_NORM) or tags.is_dead_fraction(tag) or tag.endswith("/nonfinite")


def _dead_columns(scalars: Scalars) -> dict:
    rows = scalars.mask(tags.is_dead_fraction)
    if not rows.any():
        return {"dead_fraction_final": math.nan, "dead_fraction_max": math.nan}
    steps, codes, values = scalars.step[rows], scalars.code[rows], scalars.value[rows]
    logged, index = np.unique(steps, return_inverse=True)
    mean = np.bincount(index, weights=values) / np.bincount(index)  # over layers, per logged step
    row = {"dead_fraction_final": float(mean[-1]), "dead_fraction_max": float(mean.max())}
    for code in sorted(set(codes.tolist()), key=lambda c: _natural(scalars.names[c])):
        layer = tags.layer_of(scalars.names[code])
        mine = codes == code
        row[f"dead_fraction_final/{layer}"] = float(values[mine][np.argmax(steps[mine])])
        row[f"dead_fraction_max/{layer}"] = float(values[mine].max())
    return row


def _natural(text: str) -> list:
    """Sort key putting `act/2/...` before `act/10/...`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def summarize_run(run_dir: Path, root: Path, converge_below: float | None = None, relative: bool | None = None,
                  fallback: tuple[float | None, bool | None] = (None, None)):
    """One row of the summary and the run's loss curve; problems go into the row's `error`.

    The convergence threshold is `converge_below`/`relative` where given, else the run's own
    config, else `fallback` (the sweep's), else the defaults.
    """
    own_below, own_relative = configured_thresholds(run_dir / ".hydra" / "config.yaml")
    converge_below = _first_set(converge_below, own_below, fallback[0], DEFAULT_CONVERGE_BELOW)
    relative = _first_set(relative, own_relative, fallback[1], False)
    row: dict = {"run_dir": str(run_dir.relative_to(root)) if run_dir != root else ".", "status": "unknown"}
    problems = []
    record: dict = {}
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        row["status"] = record.get("status", "unknown")
        row["error"] = record.get("error")
        row["wall_s"] = record.get("wall_s")
    except FileNotFoundError:
        problems.append("no run.json")
    except (OSError, ValueError) as err:
        problems.append(f"run.json unreadable ({err})")
    row["overrides"] = _overrides(record, run_dir)
    row["seed"] = record.get("seed", row["overrides"].get("seed"))

    scalars = read_scalars(run_dir, keep=_summary_tag)
    problems += [f"metrics {p}" for p in scalars.unreadable]
    steps, losses = scalars.series(tags.LOSS)
    finite = losses[np.isfinite(losses)]
    nonfinite_grads = scalars.value[scalars.mask(lambda tag: tag.endswith("/nonfinite"))]
    _, norm = scalars.series(tags.GLOBAL_NORM)
    stc = steps_to_converge(steps, losses, converge_below, relative)
    diverged = row["status"] == "diverged" or len(finite) < len(losses) or bool((nonfinite_grads > 0).any())
    row.update({
        "steps": int(steps[-1]) + 1 if len(steps) else 0,
        "final_loss": float(losses[-1]) if len(losses) else math.nan,
        "min_loss": float(finite.min()) if len(finite) else math.nan,
        "steps_to_converge": math.nan if stc is None else stc,
        "converged": stc is not None and not diverged,
        "diverged": diverged,
        "grad_global_norm_final": float(norm[-1]) if len(norm) else math.nan,
        **_dead_columns(scalars),
    })
    if not record and not len(scalars):
        row["status"] = "unreadable"
    if problems:
        row["error"] = "; ".join(filter(None, [row.get("error"), *problems]))
    curve = pd.DataFrame({"run_dir": row["run_dir"], "step": steps, "loss": losses})
    return row, curve


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
    fallback = configured_thresholds(folder / "multirun.yaml")
    rows, curves, unreadable = [], [], []
    for run_dir in find_runs(folder):
        row, curve = summarize_run(run_dir, folder, converge_below, relative, fallback)
        rows.append(row)
        curves.append(curve)
        if row["status"] == "unreadable" or "unreadable" in str(row.get("error") or ""):
            unreadable.append(row["run_dir"])
    overrides = [row.pop("overrides") for row in rows]
    all_keys = sorted({k for o in overrides for k in o} - NOT_SWEPT)
    # Swept keys are those whose value differs between runs (all of them for a single run).
    keys = [k for k in all_keys if len(rows) < 2 or len({repr(o.get(k)) for o in overrides}) > 1]
    fixed = {k: overrides[0].get(k) for k in all_keys if k not in keys}
    for row, o in zip(rows, overrides, strict=True):
        row.update({k: o.get(k) for k in keys})
    runs = pd.DataFrame(rows)
    layer_columns = sorted((c for c in runs.columns if c.startswith("dead_fraction_") and "/" in c), key=_natural)
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
