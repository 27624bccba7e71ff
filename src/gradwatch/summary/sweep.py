"""Sweep plumbing for Hydra multirun: progress lines in run order, and the summary at the end."""

import atexit
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from gradwatch.storage.paths import SUMMARY_MD, tensorboard_command
from gradwatch.summary.numbers import format_number

TOTAL_ENV = "GRADWATCH_SWEEP_TOTAL"


def _sweep_overrides(config: DictConfig) -> dict[str, Override]:
    """The sweep's overrides by key: the sweeper's params first, then the command line, which wins
    for a key in both. Raises hydra's OverrideParseException for text Hydra would refuse."""
    params = config.hydra.sweeper.get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    return {o.key_or_group: o for o in OverridesParser.create().parse_overrides(overrides)}


def count_jobs(config: DictConfig) -> int | None:
    """How many runs a sweep will launch, when the sweeper says so up front."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    total = 1
    try:
        for override in _sweep_overrides(config).values():
            if override.is_sweep_override():
                total *= len(list(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - a count we cannot make is shown as "?"
        return None
    return total


def name_runs_by_differences(config: DictConfig) -> None:
    """Leave the keys a sweep gives one value in every run (`experiment=...`, a `trainer.max_steps=...`
    that sweeps nothing) out of its run folders' names (`hydra.job.override_dirname`), so that
    `000_experiment=study_lr_convergence,model=linear,...` reads `000_model=linear,...`. When no key
    varies (a sweep of one run) the names keep every override.

    Hydra composes each run's config anew from the sweep's Hydra overrides plus the run's own
    (in the launcher's process or a worker's), so the keys are added there as
    `hydra.job.config.override_dirname.exclude_keys`, next to any the user excluded; the sweep's
    `multirun.yaml` and each run's `.hydra/hydra.yaml` show it.
    """
    try:
        by_key = _sweep_overrides(config)
    except Exception:  # noqa: BLE001 - overrides Hydra refuses fail the sweep itself, with Hydra's message
        return
    shared = sorted(key for key, override in by_key.items() if not override.is_sweep_override())
    if len(shared) in (0, len(by_key)):
        return
    naming = config.hydra.job.config.override_dirname
    excluded = list(dict.fromkeys([*naming.exclude_keys, *shared]))
    quoted = ",".join(f"'{key}'" for key in excluded)
    with read_write(config.hydra):
        naming.exclude_keys = excluded
        config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]")


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
    (what tells the run apart, as its folder is named, else all its overrides; status, then the
    verdict of its findings)."""
    total = os.environ.get(TOTAL_ENV, "?")
    number = int(hydra_cfg.job.num) + 1
    loss_text = _loss_text(record)
    overrides = (hydra_cfg.job.get("override_dirname")
                 or ",".join(record.get("overrides") or list(hydra_cfg.overrides.task)) or "(defaults)")
    verdict = f"  {record['verdict']}" if record.get("verdict") else ""
    line = f"[{number}/{total}] {overrides}  {record.get('status', 'unknown')}{verdict}  final_loss={loss_text}"
    if record.get("error") and record["status"] == "failed":
        line += f"  ({record['error']})"
    return line


def report_run(hydra_cfg: DictConfig, record: dict[str, Any]) -> None:
    print(run_line(hydra_cfg, record), flush=True)


# A parallel launcher's runs end in any order; their lines are printed in run order, each as soon
# as every run before it has ended. The state lives in the sweep folder, shared by the processes
# under a file lock: the next number to print and the lines waiting for it. It is of no use once
# the sweep has ended, however it ended: `_end_progress` prints what still waits and removes both.
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
    try:
        if (sweep_dir / _PROGRESS).exists():
            print_in_order(sweep_dir, None, None)  # lines of runs whose predecessors never reported
    except ValueError:
        pass  # a state cut short by an interruption: its waiting lines are lost, the runs are not
    finally:
        for name in (_PROGRESS, _PROGRESS_LOCK):
            (sweep_dir / name).unlink(missing_ok=True)


class _Interruption:
    """What an interrupted sweep leaves: its runs' folders and `multirun.yaml`, nothing of the
    sweep's own plumbing. Hydra calls `on_multirun_end` only for a sweep that ended; Ctrl-C, or a
    run that stopped on SIGINT or SIGTERM, ends the launcher's process instead (a KeyboardInterrupt
    or SystemExit), so at its exit the progress state goes (its waiting lines printed first) and a
    line says how to summarise the runs so far. A SIGTERM between runs, when no run has its own
    handler in place (each run's restores this one), exits the same way (143) instead of killing
    the process before it can tidy up. A SIGKILL leaves the two files: docs/outputs.md."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = sweep_dir
        atexit.register(self.at_exit)
        main = threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGTERM, self._sigterm) if main else None

    @staticmethod
    def _sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # the exit code a shell gives a process the signal ended

    def at_exit(self) -> None:
        _end_progress(self.sweep_dir)
        folder = shown_path(self.sweep_dir)
        print(f"gradwatch: sweep interrupted before its summary; its runs so far are in {folder} "
              f"(to summarise them: python scripts/summarize.py {folder})", flush=True)

    def close(self) -> None:
        """The sweep ended: its summary is written by `on_multirun_end`, not here."""
        atexit.unregister(self.at_exit)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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
    Run folders and lines are named by what tells the runs apart (`name_runs_by_differences`); an
    interrupted sweep leaves only its runs and says how to summarise them (`_Interruption`).
    (Each run sets its own torch threads from its config, whatever the launcher.)

    Configured in conf/train.yaml under `hydra.callbacks`. The sweep exits non-zero when a run failed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        name_runs_by_differences(config)
        self._interruption = _Interruption(Path(config.hydra.sweep.dir))
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
        sweep_dir = Path(config.hydra.sweep.dir)
        _end_progress(sweep_dir)
        try:
            failed = self._summarize(sweep_dir)  # interrupted here, the line at exit says so
        except Exception:
            self._ended()
            raise
        self._ended()
        if failed:
            print(f"gradwatch: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
            sys.exit(1)

    def _ended(self) -> None:
        interruption = getattr(self, "_interruption", None)
        if interruption is not None:
            interruption.close()

    @staticmethod
    def _summarize(sweep_dir: Path) -> list[str]:
        """The sweep summary, the mean over seeds and the lines that name them; the failed runs."""
        from gradwatch.summary.aggregate import write_mean_over_seeds
        from gradwatch.summary.table import write_summary

        # Each run's own convergence threshold (a sweep may sweep it).
        result = write_summary(sweep_dir)
        write_mean_over_seeds(sweep_dir, result)
        others = [name for name in result.written if name != SUMMARY_MD]
        print(f"gradwatch: summary of {len(result.runs)} runs in {sweep_dir}/{SUMMARY_MD} "
              f"({', '.join(others)})", flush=True)
        print(open_line(sweep_dir), flush=True)
        if result.unreadable:
            print(f"gradwatch: unreadable runs: {', '.join(result.unreadable)}", flush=True)
        return list(result.failed)
