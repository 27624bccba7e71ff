"""Sweep plumbing for Hydra multirun: progress lines, thread caps, and the summary at the end."""

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

TOTAL_ENV = "GRADWATCH_SWEEP_TOTAL"
THREADS_ENV = "GRADWATCH_TORCH_THREADS"


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
    loss = record.get("final_loss")
    return "-" if not isinstance(loss, int | float) else f"{loss:.{digits}g}"


def _shown_path(path: Path) -> str:
    """The folder relative to the working directory when it is under it (`outputs/...`)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):
        return str(path)


def last_line(record: dict[str, Any], run_dir: Path) -> str:
    """A single run's last console line: its verdict with the evidence, the final loss and the
    command that opens it, e.g. `gradwatch: dead_layer after 100 steps (layer 1: all units dead
    from step 0 (1 at step 0)), final loss 0.52; tensorboard --logdir outputs/2026-.../...`."""
    verdict = record.get("verdict") or record.get("status", "unknown")
    evidence = next((f.get("detail") for f in record.get("findings") or []
                     if isinstance(f, dict) and f.get("code") == verdict), None)
    status = record.get("status")
    ended = "" if status in ("completed", "diverged", None) else f" ({status})"
    return (f"gradwatch: {verdict}{ended} after {record.get('steps', 0)} steps"
            f"{f' ({evidence})' if evidence else ''}, final loss {_loss_text(record, 4)}; "
            f"tensorboard --logdir {shlex.quote(_shown_path(run_dir))}")


def report_run(hydra_cfg: DictConfig, record: dict[str, Any]) -> None:
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
    print(line, flush=True)


class SweepCallback(Callback):
    """Hydra callback: announces the sweep, caps torch threads for parallel launchers, prints one
    line per finished run (from its run.json), and writes the sweep summary (CSV, Markdown,
    plots) into the sweep folder when the sweep ends.

    Configured in conf/train.yaml under `hydra.callbacks`. The sweep exits non-zero when a run failed.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = count_jobs(config)
        os.environ[TOTAL_ENV] = "?" if total is None else str(total)
        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
        if n_jobs is not None:
            jobs = n_jobs if n_jobs > 0 else os.cpu_count() or 1
            # Parallel runs share the cores: one run's torch must not take them all.
            os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // jobs))
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
        report_run(config.hydra, record)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gradwatch.summary.table import write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        # Each run's own convergence threshold (a sweep may sweep it).
        result = write_summary(sweep_dir)
        others = [name for name in result.written if name != "summary.md"]
        print(f"gradwatch: summary of {len(result.runs)} runs in {sweep_dir}/summary.md "
              f"({', '.join(others)})", flush=True)
        failed = result.failed
        if result.unreadable:
            print(f"gradwatch: unreadable runs: {', '.join(result.unreadable)}", flush=True)
        if failed:
            print(f"gradwatch: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
            sys.exit(1)

