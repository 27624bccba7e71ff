"""The sweep summary: one row per run, a grouped view over seeds, written as CSV, Markdown and PNG.

Reads each run's `run.json`, its config and its parquet metrics once (never the TensorBoard
events: see scripts/bench_summary.py); outcome, findings and the report's curves all come from
that one read (`summary.results.read_results`, which the run's end calls too). Runs that cannot
be read are listed, never crash the summary.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from gradwatch.config.overrides import override_values
from gradwatch.storage.files import YAML_LOADER, read_yaml, write_atomic
from gradwatch.storage.paths import SUMMARY_CSV, SUMMARY_MD, RunPaths
from gradwatch.storage.record import read_run
from gradwatch.summary import findings as fx
from gradwatch.summary import numbers
from gradwatch.summary.outcome import Outcome, natural_key
from gradwatch.summary.results import read_results
from gradwatch.telemetry import tags

# The summary's columns, in order (docs/sweeps.md): swept keys go after `status`,
# the outcome's fields after `seed`, per-layer dead fractions after `dead_fraction_max`.
LEAD_COLUMNS = ["run_dir", "status", "verdict", "findings"]
_OUTCOME = Outcome.names()
_SPLIT = _OUTCOME.index("dead_fraction_max") + 1
RESULT_COLUMNS = ["seed", *_OUTCOME[:_SPLIT]]
TAIL_COLUMNS = [*_OUTCOME[_SPLIT:], "wall_s", "error"]
GROUPED_METRICS = ["final_loss", "min_loss", "steps_to_converge", "converged", "diverged",
                   "dead_fraction_final", "dead_fraction_max", "wall_s"]
NOT_SWEPT = {"seed", "ckpt_path"}

CSV_FILE, MARKDOWN_FILE = SUMMARY_CSV, SUMMARY_MD


@dataclass
class Summary:
    runs: pd.DataFrame
    grouped: pd.DataFrame
    swept: list[str]
    curves: pd.DataFrame  # run_dir, step, loss: the loss curve of every run
    fixed: dict = field(default_factory=dict)  # overrides every run shares
    unreadable: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # run_dir -> findings.Curves (the report's input)
    findings: dict = field(default_factory=dict)  # run_dir -> list of findings.Finding
    written: list[str] = field(default_factory=list)  # file names write_summary wrote

    @property
    def failed(self) -> list[str]:
        return self.runs.loc[self.runs["status"].isin(["failed", "interrupted"]), "run_dir"].tolist()


def find_runs(folder: Path) -> list[Path]:
    """Run folders under `folder` (itself included): those with a run.json, metrics or .hydra."""
    folder = Path(folder)
    marks = [RunPaths.RECORD, RunPaths.METRICS, RunPaths.HYDRA]
    found = {p.parent for mark in marks for p in folder.rglob(mark) if RunPaths.HYDRA not in p.parent.parts}
    return sorted(found, key=lambda p: (len(p.parts), _run_number(p), str(p)))


def _run_number(path: Path) -> int:
    head = path.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _choices(path: Path) -> dict | None:
    """`hydra.runtime.choices` of a run's `.hydra/hydra.yaml`, reading only that block (the rest
    of the file is most of a summary's YAML time); the whole file when the block is not found."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start = text.find("\n    choices:\n")
    if start >= 0:
        block = []
        for line in text[start:].split("\n")[2:]:
            if not line.startswith("      "):
                break
            block.append(line[6:])
        try:
            found = yaml.load("\n".join(block), Loader=YAML_LOADER)
            if isinstance(found, dict):
                return found
        except yaml.YAMLError:
            pass
    try:
        node = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError:
        return None
    runtime = ((node or {}).get("hydra") or {}).get("runtime") if isinstance(node, dict) else None
    choices = runtime.get("choices") if isinstance(runtime, dict) else None
    return choices if isinstance(choices, dict) else None


_MISSING = object()


def _has_interpolation(value) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return node


def _nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# (override, its key's value in the config, its group's choice) -> {key: value}: a sweep's runs
# share most overrides, and Hydra's parser is the summary's largest cost after the parquet.
_VALUES: dict = {}


def swept_values(record: dict, paths: RunPaths, config: dict | None = None) -> dict:
    """The value of each overridden key in this run: a group's choice by name (`.hydra/hydra.yaml`),
    any other key from the resolved `.hydra/config.yaml` (`config`, when already read), else as typed."""
    items = record.get("overrides")
    if not isinstance(items, list):
        loaded = read_yaml(paths.overrides)
        items = [str(i) for i in loaded] if isinstance(loaded, list) else []
    items = [str(item) for item in items]
    if not items:
        return {}
    if config is None:
        config = read_yaml(paths.config)
    if not isinstance(config, dict):
        config = None
    keys = [item.split("=", 1)[0].lstrip("+~") for item in items]
    # A group choice by its name: only a key without a dot can be a group here.
    choices = (_choices(paths.hydra_config) if any("." not in key for key in keys) else None) or {}
    values: dict = {}
    try:
        for item, key in zip(items, keys, strict=True):
            choice = {key: choices[key]} if key in choices else None
            node = _MISSING if config is None or choice else _lookup(config, key)
            if _has_interpolation(node):  # its value needs the whole config to resolve
                values.update(override_values([item], OmegaConf.create(config), choice))
                continue
            cache = (item, repr(node), repr(choice))
            if cache not in _VALUES:
                given = None if node is _MISSING else OmegaConf.create(_nested(key, node))
                _VALUES[cache] = override_values([item], given, choice)
            values.update(_VALUES[cache])
    except Exception:  # noqa: BLE001 - overrides Hydra cannot parse: no swept values for this run
        return {}
    return values


def _merged_thresholds(*configs) -> dict:
    """The `summary` and `diagnosis` sections of several configs, later ones winning per key."""
    merged: dict = {"summary": {}, "diagnosis": {}}
    for config in configs:
        if not isinstance(config, dict):
            continue
        for section, values in merged.items():
            given = config.get(section)
            if isinstance(given, dict):
                values.update({k: v for k, v in given.items() if v is not None})
    return merged


def run_thresholds(config: dict | None, fallback: dict | None = None, converge_below: float | None = None,
                   relative: bool | None = None) -> fx.Thresholds:
    """A run's thresholds: `converge_below`/`relative` where given, else its own config's
    (`summary.*`, `diagnosis.*`), else `fallback`'s (the sweep's multirun.yaml), else the defaults."""
    merged = _merged_thresholds(fallback, config)
    try:
        thresholds = fx.Thresholds.from_config(merged)
    except (TypeError, ValueError):  # a value that is no number: the sweep's, else the defaults
        try:
            thresholds = fx.Thresholds.from_config(_merged_thresholds(fallback))
        except (TypeError, ValueError):
            thresholds = fx.Thresholds()
    if converge_below is not None:
        thresholds = dataclasses.replace(thresholds, converge_below=float(converge_below))
    if relative is not None:
        thresholds = dataclasses.replace(thresholds, converge_relative=bool(relative))
    return thresholds


def summarize_run(run_dir: Path, root: Path, converge_below: float | None = None, relative: bool | None = None,
                  fallback: dict | None = None):
    """One row of the summary, the run's loss curve and its results (outcome, findings, curves);
    problems go into the row's `error`. Thresholds as in `run_thresholds`."""
    paths = RunPaths(run_dir)
    config = read_yaml(paths.config)
    thresholds = run_thresholds(config, fallback, converge_below, relative)
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
    row["overrides"] = swept_values(record, paths, config)
    row["seed"] = record.get("seed", row["overrides"].get("seed"))

    results = read_results(run_dir, thresholds)
    outcome = results.outcome
    problems += [f"metrics {p}" for p in results.unreadable]
    if row["status"] == "diverged" and not outcome.diverged:
        outcome.diverged, outcome.converged = True, False
    row["verdict"], row["findings"] = results.verdict, results.codes
    row.update(outcome.row())
    if not record and not outcome.steps:
        row["status"] = "unreadable"
    if problems:
        row["error"] = "; ".join(filter(None, [row.get("error"), *problems]))
    steps, losses = results.curves.get(tags.LOSS)
    return row, pd.DataFrame({"run_dir": row["run_dir"], "step": steps, "loss": losses}), results


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
    if "verdict" in runs.columns:  # runs per verdict: `verdict_converged`, ... in verdict order
        numeric["verdict"] = runs["verdict"].fillna(fx.NO_VERDICT).astype(str)
        counts = numeric.groupby(keys, dropna=False, sort=True)["verdict"].value_counts().unstack(fill_value=0)
        counts = counts.reindex(grouped.index).fillna(0).astype(int)
        order = [*fx.VERDICT_ORDER, fx.NO_VERDICT]
        for name in sorted(counts.columns, key=lambda v: (order.index(v) if v in order else len(order), v)):
            grouped[f"verdict_{name}"] = counts[name]
    return grouped.reset_index()


def summarize(folder: Path, converge_below: float | None = None, relative: bool | None = None) -> Summary:
    """The summary of every run under `folder`; thresholds as in `run_thresholds`, the sweep's
    `multirun.yaml` standing in for a run without a config."""
    folder = Path(folder)
    fallback = read_yaml(folder / "multirun.yaml")
    rows, curves, unreadable, metrics, findings = [], [], [], {}, {}
    for run_dir in find_runs(folder):
        row, curve, results = summarize_run(run_dir, folder, converge_below, relative, fallback)
        rows.append(row)
        curves.append(curve)
        metrics[row["run_dir"]], findings[row["run_dir"]] = results.curves, results.findings
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
    return Summary(runs, grouped, keys, curve_frame, fixed, unreadable, metrics, findings)


def _mean_std(grouped: pd.DataFrame, metric: str) -> pd.Series:
    mean, std = grouped[f"{metric}_mean"], grouped[f"{metric}_std"]
    text = [numbers.format_number(m) if not numbers.is_finite(s) or not numbers.is_finite(m)
            else f"{m:.4g} ± {s:.2g}" for m, s in zip(mean, std, strict=True)]
    return pd.Series(text, index=grouped.index)


def readable_grouped(summary: Summary) -> pd.DataFrame:
    """The grouped view for people: `mean ± std` per metric, rates for converged/diverged."""
    grouped = summary.grouped
    keys = [c for c in grouped.columns if c in summary.swept or c == "setting"]
    table = grouped[keys + ["runs"]].copy()
    for metric in ("final_loss", "min_loss", "steps_to_converge", "dead_fraction_final", "dead_fraction_max"):
        if f"{metric}_mean" in grouped and grouped[f"{metric}_mean"].notna().any():  # a linear model: no ReLU
            table[metric] = _mean_std(grouped, metric)
    for rate in ("converged", "diverged"):
        if f"{rate}_mean" in grouped:
            table[rate] = [f"{v:.0%}" if numbers.is_finite(v) else numbers.MISSING for v in grouped[f"{rate}_mean"]]
    counts = [c for c in grouped.columns if c.startswith("verdict_")]
    if counts:  # `converged 2, dead_layer 1`: the runs of the setting per verdict
        names = [c.removeprefix("verdict_") for c in counts]
        table["verdicts"] = [", ".join(f"{name} {int(n)}" for name, n in zip(names, row, strict=True) if n)
                             for row in grouped[counts].itertuples(index=False)]
    return table


# The per-run table of summary.md, narrow enough for a terminal: the run's number for its folder
# (the swept values have their own columns) and the results people compare; summary.csv has all.
RUN_TABLE = ["status", "verdict", "final_loss", "steps_to_converge", "dead_fraction_final", "accuracy_final"]


def short_name(run_dir: str) -> str:
    """A run's name in summary.md: the job number of `<n>_<overrides>`, else the folder as it is.

    >>> short_name("007_model=mlp,optimizer.lr=0.1"), short_name("a/b")
    ('007', 'a/b')
    """
    head = str(run_dir).split("_", 1)[0]
    return head if head.isdigit() else str(run_dir)


def readable_runs(summary: Summary) -> pd.DataFrame:
    """The per-run table for people: `run` (short), the swept keys, seed, then RUN_TABLE's columns
    that hold something (accuracy only for classification, status only when a run did not complete)."""
    runs = summary.runs
    table = pd.DataFrame({"run": runs["run_dir"].map(short_name)})
    for key in [*summary.swept, "seed"]:
        if key in runs:
            table[key] = runs[key].map(lambda v: v if not isinstance(v, list) else str(v))
    for column in RUN_TABLE:
        if column not in runs or runs[column].isna().all():
            continue
        if column == "status" and (runs[column] == "completed").all():
            continue
        table[column] = runs[column]
    return table


def to_markdown(summary: Summary, folder: Path) -> str:
    lines = [f"# Sweep summary: {folder}", "",
             f"{len(summary.runs)} runs; swept: {', '.join(summary.swept) or 'nothing'}; "
             f"fixed: {', '.join(f'{k}={v}' for k, v in summary.fixed.items()) or 'nothing'}.", ""]
    if summary.unreadable:
        lines += [f"Unreadable: {', '.join(summary.unreadable)}", ""]
    happened = fx.what_happened(summary.runs, summary.swept) if len(summary.runs) else []
    if happened:
        lines += ["## What happened", "", *happened, ""]
    lines += ["## Per setting (mean and std over seeds)", "",
              numbers.to_markdown(readable_grouped(summary)) if len(summary.grouped) else "(none)", "",
              "## Per run", "", f"Every column, with the full run folder names, in {CSV_FILE}.", "",
              numbers.to_markdown(readable_runs(summary)), ""]
    if len(summary.runs):
        lines += ["## Each run's verdict and its evidence", "", *verdict_lines(summary), ""]
    return "\n".join(lines)


def verdict_lines(summary: Summary) -> list[str]:
    """One Markdown line per run: its number, its verdict and the evidence, as the run's console line
    words them (`findings.evidence`), e.g. `- **001** diverged: loss inf at step 12, last finite ...`."""
    return [f"- **{short_name(run_dir)}** {name}: {fx.evidence(name, summary.findings.get(run_dir))}"
            for run_dir, name in zip(summary.runs["run_dir"], summary.runs["verdict"], strict=True)]


def write_summary(folder: Path, converge_below: float | None = None, relative: bool | None = None) -> Summary:
    """Write summary.csv, summary.md and the report's PNGs (`report.render_reports`: report.png,
    report_heatmap.png, report_dead.png, report_gradients.png as the runs have data for them)
    into `folder`, each file atomically; `summary.written` lists the file names."""
    from gradwatch.summary.report import render_reports

    folder = Path(folder)
    summary = summarize(folder, converge_below, relative)
    write_atomic(folder / CSV_FILE, numbers.to_csv(summary.runs).encode())
    write_atomic(folder / MARKDOWN_FILE, to_markdown(summary, folder).encode())
    pngs = render_reports(summary, summary.metrics) if len(summary.runs) else {}
    for name, png in pngs.items():
        write_atomic(folder / name, png)
    summary.written = [CSV_FILE, MARKDOWN_FILE, *pngs]
    return summary
