"""Benchmark: the sweep summary's reading vs tbparse reading the same runs' TensorBoard events.

Builds a synthetic sweep folder the way real runs write it (default 50 runs x 300 scalar tags x
200 steps): `<folder>/<n>_optimizer.lr=<v>,seed=<s>/` with `run.json`, `tb/` events (one event
per step holding all scalars, as `StepRecorder` writes them) and `metrics/` parquet parts (flushed
every 100 steps). Then, in the same process and on the same folder, it times

* the summariser: `gradwatch.summary.table.summarize(folder)` (finding the runs, reading every run.json
  and every parquet value, computing the per-run rows, the grouped view and the loss curves), and
* tbparse: `tbparse.SummaryReader(folder, pivot=False).scalars` (reading every scalar event),

and prints both times and their ratio. The target is the summary in at most 1/50 of tbparse's time
with every value kept (no reservoir sampling). After timing, it checks (and prints) that the
summariser saw every value: the rows `read_metrics` returns over all runs are exactly the values
written, and each run's final_loss, min_loss, steps, grad_global_norm_final, dead-fraction columns
and loss curve match what was written; tbparse's row count is checked too.

The 300 tags per step are `train/loss`, `lr`, `grad/<param>/<stat>` (the 6 gradient statistics)
for enough parameters, `grad/global_norm` and `act/<layer>/dead_fraction|zero_fraction`. Gradient
blocks are kept whole, so the last activation layer may carry only its dead_fraction when the
count needs it (297 = 44 x 6 + 33). Values are synthetic and deterministic (numpy, seeded per run);
the loss decreases strictly.

    python scripts/bench_summary.py            # full size; tbparse takes a minute or two
    python scripts/bench_summary.py --quick    # 5 runs x 300 tags x 50 steps, a smoke run

`--write-summary FOLDER` times instead what a sweep's end does on a real sweep folder (e.g. the
48 runs of `make sweep`): `write_summary` (the table, every run's findings, summary.md and every
report PNG), the imports apart, against the target of WRITE_TARGET_S seconds:

    python train.py experiment=study_lr_convergence hydra.sweep.dir=/tmp/sw48
    python scripts/bench_summary.py --write-summary /tmp/sw48
"""

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from gradwatch.storage.parquet import ParquetSink, read_metrics
from gradwatch.storage.paths import RunPaths
from gradwatch.storage.record import RunRecord
from gradwatch.summary.table import summarize
from gradwatch.telemetry import tags

LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
FLUSH_EVERY_N_STEPS = 100
TARGET_RATIO = 50.0
WRITE_TARGET_S = 2.0  # the summary of `make sweep` (48 runs), plots included


@dataclass
class WrittenRun:
    """What one synthetic run wrote: enough to check the summary against."""

    name: str
    tag_names: list[str]
    values: np.ndarray  # (steps, tags), float64, as handed to both sinks


def tag_names(count: int) -> list[str]:
    """`count` tags in the order a real step writes them: loss, lr, gradients, global norm, activations."""
    if count < 3:
        raise ValueError(f"tags={count} is not valid: allowed is >= 3 (loss, lr and global norm)")
    rest = count - 3
    n_act = 2 * (rest // 20)  # about a tenth of the tags are activation statistics
    n_act += (rest - n_act) % len(tags.GRAD_STATS)  # gradient blocks stay whole
    n_params = (rest - n_act) // len(tags.GRAD_STATS)
    params = [f"{2 * (i // 2)}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(n_params)]
    grads = [tags.grad(p, stat) for p in params for stat in tags.GRAD_STATS]
    layers = [str(2 * j + 1) for j in range(math.ceil(n_act / len(tags.ACT_STATS)))]
    acts = [tags.act(layer, stat) for layer in layers for stat in tags.ACT_STATS][:n_act]
    names = [tags.LOSS, tags.LR, *grads, tags.GLOBAL_NORM, *acts]
    assert len(names) == count and len(set(names)) == count
    return names


def synthetic_values(names: list[str], steps: int, lr: float, seed: int) -> np.ndarray:
    """(steps, tags) values: a strictly decreasing loss, a constant lr, plausible statistics."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)
    values = np.empty((steps, len(names)), dtype=np.float64)
    index = {name: i for i, name in enumerate(names)}
    rate = 2.0 * lr / (1.0 + 10.0 * lr)  # faster for larger lr, never absurd
    decay = np.exp(-rate * rng.uniform(0.5, 1.5, steps))
    decay[0] = 1.0
    values[:, index[tags.LOSS]] = rng.uniform(1.0, 4.0) * np.cumprod(decay)
    values[:, index[tags.LR]] = lr
    norms = []
    for name in names:
        column = index[name]
        if name.startswith("grad/") and name != tags.GLOBAL_NORM:
            stat = name.rsplit("/", 1)[1]
            scale = np.exp(-0.01 * t) * rng.uniform(0.1, 1.0)
            if stat == "mean":
                values[:, column] = rng.normal(0.0, 0.01, steps) * scale
            elif stat == "std":
                values[:, column] = rng.uniform(0.5, 1.5, steps) * scale
            elif stat == "zero_fraction":
                values[:, column] = rng.uniform(0.0, 0.05, steps)
            elif stat == "norm":
                values[:, column] = rng.uniform(0.5, 1.5, steps) * scale * 10.0
                norms.append(column)
            elif stat == "abs_max":
                values[:, column] = rng.uniform(1.0, 3.0, steps) * scale
            else:  # nonfinite: a healthy run has none
                values[:, column] = 0.0
        elif name.startswith("act/"):
            base = np.clip(rng.uniform(0.0, 0.2) + 0.001 * t + rng.normal(0.0, 0.01, steps), 0.0, 1.0)
            values[:, column] = base if name.endswith("/dead_fraction") else np.clip(base + 0.05, 0.0, 1.0)
    values[:, index[tags.GLOBAL_NORM]] = np.sqrt((values[:, norms] ** 2).sum(axis=1)) if norms else 0.0
    return values


def write_run(run_dir: Path, names: list[str], values: np.ndarray, overrides: list[str], seed: int) -> None:
    """run.json, TensorBoard events and parquet parts, written as StepRecorder and the pipeline do."""
    run_dir.mkdir(parents=True)
    record = RunRecord(run_dir, overrides, seed)
    record.write(status="running")
    writer = SummaryWriter(log_dir=str(RunPaths(run_dir).tb))
    file_writer = writer._get_file_writer()
    sink = ParquetSink(RunPaths(run_dir).metrics)
    names_tuple = tuple(names)
    for step, row in enumerate(values.tolist()):
        event = Summary(value=[Summary.Value(tag=n, simple_value=v) for n, v in zip(names, row, strict=True)])
        file_writer.add_summary(event, step)
        sink.write(step, names_tuple, row)
        if (step + 1) % FLUSH_EVERY_N_STEPS == 0:
            sink.flush()
            writer.flush()
    sink.flush()
    writer.close()
    loss = values[:, names.index(tags.LOSS)]
    record.write(status="completed", steps=len(values), final_loss=float(loss[-1]),
                 min_loss=float(loss.min()), wall_s=0.0)


def build_sweep(folder: Path, runs: int, n_tags: int, steps: int) -> list[WrittenRun]:
    names = tag_names(n_tags)
    written = []
    for n in range(runs):
        lr, seed = LRS[n % len(LRS)], n // len(LRS)
        overrides = [f"optimizer.lr={lr}", f"seed={seed}"]
        name = f"{n}_{','.join(overrides)}"
        values = synthetic_values(names, steps, lr, seed=1000 * seed + n)
        write_run(folder / name, names, values, overrides, seed)
        written.append(WrittenRun(name, names, values))
    return written


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        failures.append(what)


def verify(folder: Path, written: list[WrittenRun], summary, tb_rows: int) -> list[str]:
    """Check that the summariser saw every value written; returns the failed checks."""
    failures: list[str] = []
    expected = sum(run.values.size for run in written)
    by_name = {run.name: run for run in written}

    read_rows, exact = 0, True
    for run in written:
        metrics = read_metrics(folder / run.name)
        read_rows += len(metrics)
        table = metrics.pivot(index="step", columns="tag", values="value").reindex(columns=run.tag_names)
        exact &= table.shape == run.values.shape and bool(np.array_equal(table.to_numpy(), run.values))
    check(read_rows == expected, f"read_metrics rows over all runs: {read_rows} == {expected} written",
          failures)
    check(exact, "read_metrics values equal the written values, every run, step and tag", failures)

    runs = summary.runs
    check(len(runs) == len(written), f"summary rows: {len(runs)} == {len(written)} runs", failures)
    check(not summary.unreadable, f"unreadable runs: {summary.unreadable or 'none'}", failures)
    fields = {"final_loss": 0, "min_loss": 0, "steps": 0, "grad_global_norm_final": 0, "dead_fraction": 0}
    for row in runs.itertuples(index=False):
        run = by_name.get(row.run_dir)
        if run is None:
            fields["steps"] += 1
            continue
        column = {name: i for i, name in enumerate(run.tag_names)}
        loss = run.values[:, column[tags.LOSS]]
        fields["final_loss"] += row.final_loss != loss[-1]
        fields["min_loss"] += row.min_loss != loss.min()
        fields["steps"] += row.steps != len(loss)
        last_norm = run.values[-1, column[tags.GLOBAL_NORM]]
        fields["grad_global_norm_final"] += row.grad_global_norm_final != last_norm
        dead = run.values[:, [i for name, i in column.items() if tags.is_dead_fraction(name)]].mean(axis=1)
        fields["dead_fraction"] += not (np.isclose(row.dead_fraction_final, dead[-1], rtol=1e-12, atol=0)
                                        and np.isclose(row.dead_fraction_max, dead.max(), rtol=1e-12, atol=0))
    check(fields["final_loss"] == 0, "final_loss of each run == the last train/loss written", failures)
    check(fields["min_loss"] == 0, "min_loss of each run == the smallest train/loss written", failures)
    check(fields["steps"] == 0, "steps of each run == the steps written", failures)
    check(fields["grad_global_norm_final"] == 0,
          "grad_global_norm_final of each run == the last grad/global_norm written", failures)
    check(fields["dead_fraction"] == 0,
          "dead_fraction_final/max == mean over layers of every act/*/dead_fraction written", failures)

    curves_ok = len(summary.curves) == sum(len(run.values) for run in written)
    for run_dir, curve in summary.curves.groupby("run_dir", sort=False):
        run = by_name[run_dir]
        loss = run.values[:, run.tag_names.index(tags.LOSS)]
        curves_ok &= np.array_equal(curve["step"].to_numpy(), np.arange(len(loss)))
        curves_ok &= np.array_equal(curve["loss"].to_numpy(), loss)
    check(curves_ok, f"loss curves: every step of every run ({len(summary.curves)} points)", failures)
    check(tb_rows == expected, f"tbparse scalar rows: {tb_rows} == {expected} written", failures)
    return failures


def time_write_summary(folder: Path, repeats: int = 3) -> int:
    """Time `write_summary(folder)` (imports timed apart; best and first of `repeats`)."""
    started = time.perf_counter()
    from gradwatch.summary import report  # noqa: F401 - matplotlib: imported here to time it apart
    from gradwatch.summary.table import write_summary

    imports_s = time.perf_counter() - started
    times, summary = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        summary = write_summary(folder)
        times.append(time.perf_counter() - started)
    verdicts = summary.runs["verdict"].value_counts().to_dict() if len(summary.runs) else {}
    print(f"write_summary of {len(summary.runs)} runs in {folder}: first {times[0]:.3f} s, best {min(times):.3f} s "
          f"(imports {imports_s:.3f} s apart); wrote {', '.join(summary.written)}")
    print(f"verdicts: {verdicts}")
    verdict = "met" if times[0] <= WRITE_TARGET_S else "NOT met"
    print(f"target <= {WRITE_TARGET_S:g} s for the first call: {verdict}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="runs in the sweep (default 50)")
    parser.add_argument("--tags", type=int, default=300, help="scalar tags per step (default 300)")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 runs x 300 tags x 50 steps")
    parser.add_argument("--folder", type=Path, default=None,
                        help="build the sweep here (a new or empty folder; kept); default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir instead of removing it")
    parser.add_argument("--write-summary", type=Path, default=None, metavar="SWEEP_FOLDER",
                        help="time write_summary (findings and plots included) on an existing sweep folder")
    args = parser.parse_args(argv)
    if args.write_summary is not None:
        if not args.write_summary.is_dir():
            parser.error(f"write-summary={args.write_summary} is not valid: allowed is an existing folder of runs")
        return time_write_summary(args.write_summary)
    if args.quick:
        args.runs, args.tags, args.steps = 5, 300, 50
    for key in ("runs", "steps"):
        if getattr(args, key) < 1:
            parser.error(f"{key}={getattr(args, key)} is not valid: allowed is >= 1")
    if args.tags < 3:
        parser.error(f"tags={args.tags} is not valid: allowed is >= 3 (loss, lr and global norm)")
    if args.folder is not None and args.folder.exists() and any(args.folder.iterdir()):
        parser.error(f"folder={args.folder} is not valid: allowed is a new or empty folder")

    temporary = args.folder is None
    folder = Path(tempfile.mkdtemp(prefix="gradwatch-bench-")) if temporary else args.folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        total = args.runs * args.tags * args.steps
        print(f"sweep: {args.runs} runs x {args.tags} tags x {args.steps} steps = {total} values in {folder}")
        started = time.perf_counter()
        written = build_sweep(folder, args.runs, args.tags, args.steps)
        print(f"build: {time.perf_counter() - started:.2f} s")

        started = time.perf_counter()
        summary = summarize(folder)
        summary_s = time.perf_counter() - started
        print(f"summary reading (gradwatch.summary.table.summarize): {summary_s:.3f} s")

        import tbparse  # a dev dependency: imported here, after the build, outside both timings

        started = time.perf_counter()
        scalars: pd.DataFrame = tbparse.SummaryReader(str(folder), pivot=False).scalars
        tbparse_s = time.perf_counter() - started
        print(f"tbparse reading (SummaryReader(pivot=False).scalars): {tbparse_s:.3f} s")

        print("checks:")
        failures = verify(folder, written, summary, len(scalars))
        ratio = tbparse_s / summary_s if summary_s > 0 else math.inf
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"summary reading: {summary_s:.3f} s; tbparse: {tbparse_s:.3f} s; "
              f"ratio tbparse/summary: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x: {verdict})")
        if failures:
            print(f"FAILED checks: {len(failures)}", file=sys.stderr)
            return 1
        return 0
    finally:
        if temporary and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif temporary:
            print(f"kept {folder}")


if __name__ == "__main__":
    sys.exit(main())
