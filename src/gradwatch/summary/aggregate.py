"""A sweep's settings in TensorBoard: the mean over seeds of each setting's curves, and which folder
to open so that TensorBoard starts on a few lines.

TensorBoard selects at most 40 runs when it opens a folder (past that it selects none: blank
Scalars and Custom Scalars tabs). A sweep of 48 runs over 16 settings therefore also gets
`<sweep>/mean_over_seeds/<setting>/`, one TensorBoard run per setting holding, per step, the
mean over its seeds of the loss (and accuracy), the global and per-parameter gradient norms and
the dead fractions (finite values only: a diverged seed leaves the mean from its first
non-finite step), under the runs' own tag names and custom-scalars layout, and an HParams row
per setting: its swept values against the mean over its runs of their final metrics (and the
shares that converged and diverged).

    >>> write_mean_over_seeds(sweep_dir, summary)   # doctest: +SKIP
    PosixPath('outputs/multirun/.../mean_over_seeds')
    >>> logdir_to_open(sweep_dir)                   # doctest: +SKIP
    PosixPath('outputs/multirun/.../mean_over_seeds')
"""

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from gradwatch.config.resolvers import safe_dirname
from gradwatch.storage.events import EventFile, hparams_summaries, layout_summary
from gradwatch.storage.paths import MEAN_OVER_SEEDS
from gradwatch.summary.findings import Curves
from gradwatch.summary.numbers import finite_or_nan
from gradwatch.summary.outcome import Outcome
from gradwatch.telemetry import tags

TENSORBOARD_SELECTS = 40  # runs TensorBoard selects when it opens a folder; past that, none
ALL_RUNS = "all_runs"  # the one setting (its folder name) of a sweep over seeds only


def _mean_tag(tag: str) -> bool:
    """The tags averaged over seeds: what a reader compares between settings."""
    return (tag in (tags.LOSS, tags.ACCURACY, tags.GLOBAL_NORM) or tags.is_dead_fraction(tag)
            or tags.is_grad_stat(tag, "norm"))


def setting_names(runs: pd.DataFrame, swept: list[str]) -> pd.Series:
    """Each run's setting as a folder name: its swept keys, by their last part when that names
    them alone (TensorBoard's run list shows a name's start), and values: `model=mlp,lr=0.1`."""
    keys = [k for k in swept if k in runs.columns]
    if not keys:
        return pd.Series(ALL_RUNS, index=runs.index)
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else keys
    text = [",".join(f"{k}={v.replace(' ', '')}" for k, v in zip(names, row, strict=True))  # `[32, 32]` as typed
            for row in runs[keys].astype(str).itertuples(index=False)]
    return pd.Series([safe_dirname(t) for t in text], index=runs.index)


def mean_over_seeds(curves: list[Curves]) -> pd.DataFrame:
    """step x tag: the mean over `curves` of each averaged tag at each step, over the runs whose
    value there is finite (NaN where none is); columns in the first run's (network) order.

    >>> a = Curves(pd.DataFrame({"step": [0, 1], "tag": ["train/loss"] * 2, "value": [4.0, 2.0]}))
    >>> b = Curves(pd.DataFrame({"step": [0, 1], "tag": ["train/loss"] * 2, "value": [2.0, float("inf")]}))
    >>> mean_over_seeds([a, b])["train/loss"].tolist()
    [3.0, 2.0]
    """
    names = list(dict.fromkeys(n for c in curves for n in c.names if _mean_tag(n)))
    columns = {}
    for name in names:
        series = []
        for run in curves:
            if name in run:
                steps, values = run.get(name)
                series.append(pd.Series(values, index=steps))
        both = pd.concat(series, axis=1)
        columns[name] = both.where(np.isfinite(both.to_numpy(dtype=float))).mean(axis=1, skipna=True)
    return pd.DataFrame(columns).sort_index()


def _hparam(value):
    """A swept value as the HParams tab takes it: a bool, a number or text."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return value.item() if isinstance(value, np.generic) else value
    return str(value)


def setting_metrics(members: pd.DataFrame) -> dict[str, float]:
    """A setting's HParams metrics: the mean over its runs of each run's HParams metric (finite
    values only), and the shares of its runs that converged and diverged.

    >>> setting_metrics(pd.DataFrame({"final_loss": [0.5, float("inf")], "converged": [True, False]}))
    {'hparams/final_loss': 0.5, 'hparams/converged': 0.5}
    """
    metrics = {}
    for name in [*Outcome.hparam_names(), "converged", "diverged"]:
        if name not in members:
            continue
        values = pd.to_numeric(members[name], errors="coerce").astype(float)
        finite = values[np.isfinite(values)]
        metrics[tags.hparam_metric(name)] = finite_or_nan(float(finite.mean()) if len(finite) else math.nan)
    return metrics


def write_mean_over_seeds(folder: Path, summary) -> Path | None:
    """`folder/mean_over_seeds/<setting>/` for every setting of the summary's runs, replacing an
    older one; None (and nothing written) when no setting has more than one run."""
    folder = Path(folder)
    target = folder / MEAN_OVER_SEEDS
    runs = summary.runs
    if not len(runs):
        return None
    settings = setting_names(runs, summary.swept)
    if settings.value_counts().max() < 2:
        return None
    shutil.rmtree(target, ignore_errors=True)
    for setting, members in runs.groupby(settings, sort=False):
        curves = [summary.metrics[r] for r in members["run_dir"].astype(str) if r in summary.metrics]
        if not curves:
            continue
        means = mean_over_seeds(curves)
        events = EventFile(target / setting)
        params = [tags.layer_of(n) for n in means.columns if tags.is_grad_stat(n, "norm")]
        layers = [tags.layer_of(n) for n in means.columns if tags.is_dead_fraction(n)]
        events.add_summary(0, layout_summary(tags.custom_scalars_layout(params, layers, averaged=True)))
        values = means.to_numpy(dtype=np.float64)
        names = np.asarray(means.columns, dtype=object)
        for step, row in zip(means.index, values, strict=True):
            finite = np.isfinite(row)
            if finite.any():
                events.add_scalars(int(step), tuple(names[finite]), row[finite])
        keys = [k for k in summary.swept if k in members.columns]
        hparams = {k: _hparam(members[k].iloc[0]) for k in keys} | {"runs": len(members)}
        metrics = setting_metrics(members)
        last = int(means.index.max()) + 1 if len(means) else 0
        for hparams_summary in hparams_summaries(hparams, list(metrics)):
            events.add_summary(last, hparams_summary)
        events.add_scalars(last, tuple(metrics), np.array(list(metrics.values()), dtype=np.float64))
        events.close()
    return target


def tensorboard_runs(folder: Path) -> int:
    """How many TensorBoard runs (folders holding event files) are under `folder`."""
    return len({p.parent for p in Path(folder).rglob("events.out.tfevents.*")})


def logdir_to_open(folder: Path) -> Path:
    """The folder TensorBoard should open for a run or a sweep: the sweep itself when TensorBoard
    selects all its runs, else its mean over seeds when that fits, else the sweep anyway."""
    folder = Path(folder)
    means = folder / MEAN_OVER_SEEDS
    if tensorboard_runs(folder) > TENSORBOARD_SELECTS and means.is_dir() \
            and tensorboard_runs(means) <= TENSORBOARD_SELECTS:
        return means
    return folder


def newest_output(outputs: Path) -> Path | None:
    """The newest run or sweep folder under `outputs` (`<date>/<time>` or `multirun/<date>/<time>`),
    by the date and time in its name."""
    outputs = Path(outputs)
    runs = [p for p in outputs.glob("*/*") if p.is_dir() and p.parent.name != "multirun"]
    sweeps = [p for p in outputs.glob("multirun/*/*") if p.is_dir()]
    return max([*runs, *sweeps], key=lambda p: (p.parent.name, p.name), default=None)
