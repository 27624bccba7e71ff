"""Sweep plumbing for Hydra multirun: progress lines in run order, and the summary at the end."""

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from gradwatch.storage.paths import SUMMARY_MD, tensorboard_command
from gradwatch.summary.numbers import format_number

TOTAL_ENV = "GRADWATCH_SWEEP_TOTAL"


def count_jobs(config: DictConfig) -> int | None:
    """How many runs a sweep will launch, when the sweeper says so up front."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    # The sweeper's params first, then the command line, which wins for a key in both.
    params = sweeper.get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    total = 1
    try:
        by_key = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(overrides)}
        for override in by_key.values():
            if override.is_sweep_override():
                total *= len(list(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - a count we cannot make is shown as "?"
        return None
    return total


def _loss_text(record: dict[str, Any], digits: int = 6) -> str:
    return format_number(record.get("final_loss"), f".{digits}g")


def shown_path(path: Path) -> str:
    """A folder as a command line shows it: relative to the working directory when it is under it
    (`outputs/...`), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):
        return str(path)


def run_line(hydra_cfg: DictConfig, record: dict[str, Any]) -> str:
    """One line per finished run: `[3/18] optimizer.lr=0.1,seed=2  completed  converged  final_loss=0.0012`
    (status, then the verdict of its findings)."""
    total = os.environ.get(TOTAL_ENV, "?")
    number = int(hydra_cfg.job.num) + 1
    loss_text = _loss_text(record)
    overrides = ",".join(record.get("overrides") or list(hydra_cfg.overrides.task)) or "(defaults)"
    verdict = f"  {record['verdict']}" if record.get("verdict") else ""
    line = f"[{number}/{total}] {overrides}  {record.get('status', 'unknown')}{verdict}  final_loss={loss_text}"
    if record.get("error") and record["status"] == "failed":
        line += f"  ({record['error']})"
    return line


def report_run(hydra_cfg: DictConfig, record: dict[str, Any]) -> None:
    print(run_line(hydra_cfg, record), flush=True)


# A parallel launcher's runs end in any order; their lines are printed in run order, each as soon
# as every run before it has ended. The state lives in the sweep folder, shared by the processes
# under a file lock: the next number to print and the lines waiting for it.
_PROGRESS, _PROGRESS_LOCK = ".progress.json", ".progress.lock"


def print_in_order(sweep_dir: Path, number: int | None, line: str | None) -> None:
    """Queue run `number`'s `line` and print every line now due; `number=None` prints all that wait."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    state_path = sweep_dir / _PROGRESS
    with open(sweep_dir / _PROGRESS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(state_path.read_text()) if state_path.exists() else {"next": 1, "waiting": {}}
        waiting = {int(k): v for k, v in state["waiting"].items()}
        if number is not None:
            waiting[number] = line
        due = sorted(waiting) if number is None else []
        while number is not None and state["next"] in waiting:
            due.append(state["next"])
            state["next"] += 1
        for n in due:
            print(waiting.pop(n), flush=True)
        state["waiting"] = waiting
        state_path.write_text(json.dumps(state))


def _end_progress(sweep_dir: Path) -> None:
    if (sweep_dir / _PROGRESS).exists():
        print_in_order(sweep_dir, None, None)  # lines of runs whose predecessors never reported
    for name in (_PROGRESS, _PROGRESS_LOCK):
        (sweep_dir / name).unlink(missing_ok=True)


def open_line(folder: Path) -> str:
    """The line that says how to open a sweep in TensorBoard: the whole sweep when TensorBoard
    selects all its runs, else the mean over seeds per setting (and the sweep for every run)."""
    from gradwatch.summary.aggregate import logdir_to_open

    logdir = logdir_to_open(folder)
    if logdir == Path(folder):
        return f"gradwatch: TensorBoard: {tensorboard_command(shown_path(folder))}"
    return (f"gradwatch: TensorBoard, the mean over seeds per setting: {tensorboard_command(shown_path(logdir))}"
            f" (every run: --logdir {shown_path(folder)})")


class SweepCallback(Callback):
    """Hydra callback: announces the sweep, prints one line per finished run (from its run.json,
    in run order), and writes the sweep summary (CSV, Markdown, plots) and the mean over seeds per
    setting into the sweep folder when the sweep ends, then says how to open it in TensorBoard.
    (Each run sets its own torch threads from its config, whatever the launcher.)

    Configured in conf/train.yaml under `hydra.callbacks`. The sweep exits non-zero when a run failed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = count_jobs(config)
        os.environ[TOTAL_ENV] = "?" if total is None else str(total)
        print(f"gradwatch: sweep of {os.environ[TOTAL_ENV]} runs into {config.hydra.sweep.dir}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from gradwatch.storage.record import read_run

        try:
            record = read_run(config.hydra.runtime.output_dir)
        except (OSError, ValueError) as err:
            record = {"status": "unreadable", "error": f"run.json: {err}"}
        if record.get("status") == "running":  # the job ended without recording why
            error = job_return._return_value if isinstance(job_return._return_value, BaseException) else None
            record = {**record, "status": "failed", "error": f"{type(error).__name__}: {error}" if error else None}
        print_in_order(Path(config.hydra.sweep.dir), int(config.hydra.job.num) + 1, run_line(config.hydra, record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gradwatch.summary.aggregate import write_mean_over_seeds
        from gradwatch.summary.table import write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        _end_progress(sweep_dir)
        # Each run's own convergence threshold (a sweep may sweep it).
        result = write_summary(sweep_dir)
        write_mean_over_seeds(sweep_dir, result)
        others = [name for name in result.written if name != SUMMARY_MD]
        print(f"gradwatch: summary of {len(result.runs)} runs in {sweep_dir}/{SUMMARY_MD} "
              f"({', '.join(others)})", flush=True)
        print(open_line(sweep_dir), flush=True)
        failed = result.failed
        if result.unreadable:
            print(f"gradwatch: unreadable runs: {', '.join(result.unreadable)}", flush=True)
        if failed:
            print(f"gradwatch: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
            sys.exit(1)

