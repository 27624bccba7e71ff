"""One run: config -> objects -> Lightning fit -> TensorBoard, parquet, checkpoint and run.json.

`train.py` calls `run(cfg)`; it returns the final loss, the value Hydra's sweepers minimise.
"""

import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from gradwatch.config.build import build, call_target
from gradwatch.config.cli import split_override
from gradwatch.config.errors import ConfigError, is_number
from gradwatch.storage.record import RunRecord
from gradwatch.summary import sweep
from gradwatch.summary.outcome import finite_or_none, steps_to_converge
from gradwatch.telemetry import tags
from gradwatch.telemetry.recorder import TB_DIR, StepRecorder
from gradwatch.training.checkpointing import LastCheckpoint
from gradwatch.training.module import GradwatchModule
from gradwatch.training.progress import StepProgressBar

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
# Exit codes of an interrupted run, as shells report signals.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class SigtermGuard:
    """SIGTERM for the whole run, not only Lightning's loop (whose handler exists from the end of
    setup to the end of fit): it raises SystemExit, recorded as `interrupted` with exit code 143.
    `defer()` turns it into a flag once training is over, so the results still get written."""

    def __init__(self):
        self.received = False
        self._previous = None
        self._installed = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "SigtermGuard":
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def _raise(self, signum, frame) -> None:
        self.received = True
        raise SystemExit(EXIT_SIGTERM)

    def _note(self, signum, frame) -> None:
        self.received = True

    def defer(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._note)

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def resolve_ckpt_path(value: str | None, run_dir: Path) -> Path | None:
    if value is None:
        return None
    path = run_dir / CKPT_DIR / LAST_CKPT if value == "last" else Path(value)
    if not path.is_file():
        raise ConfigError("ckpt_path", value, f"null, `last` or an existing checkpoint file (no file at {path})")
    return path


def checkpoint_step(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        reason = _first_line(err)[:120]
        raise ConfigError("ckpt_path", str(path), f"a checkpoint written by gradwatch ({reason})") from None


def _check_top_level(cfg: DictConfig) -> None:
    below = cfg.summary.converge_below
    if not is_number(below) or below < 0:
        raise ConfigError("summary.converge_below", below, "a number >= 0")


def _telemetry(cfg: DictConfig, recorder: StepRecorder):
    if not cfg.telemetry.enabled:
        return None
    node = {k: v for k, v in OmegaConf.to_container(cfg.telemetry, resolve=True).items() if k != "enabled"}
    try:
        return call_target(node, recorder=recorder)
    except ConfigError as err:
        raise ConfigError(f"telemetry.{err.key}", err.value, err.allowed) from None


def _first_line(err: BaseException) -> str:
    """`Type: first line` of an error; for Hydra's instantiate errors, of the error behind them."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        target = str(err).split("'")[1] if str(err).count("'") >= 2 else "a _target_"
        return f"calling {target}: {_first_line(err.__cause__)}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Error loading 'x':" says why on its last line
        text = f"{text} {lines[-1]}"
    return f"{type(err).__name__}: {text}"


def _trainer(cfg: DictConfig, logger: TensorBoardLogger, callbacks: list, multirun: bool):
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        # Telemetry and the loss curve count optimizer steps; accumulation would log a step twice.
        raise ConfigError("trainer.accumulate_grad_batches", accumulate, "1 (use a larger dataset.batch_size)")
    if multirun:
        trainer_cfg["enable_progress_bar"] = False
    elif trainer_cfg.get("enable_progress_bar", True):
        callbacks = [*callbacks, StepProgressBar()]
    return instantiate(trainer_cfg, logger=logger, callbacks=callbacks, log_every_n_steps=1,
                       enable_checkpointing=False)


def outcome(recorder: StepRecorder, cfg: DictConfig) -> dict:
    """The results run.json and the HParams tab report, from what the recorder saw."""
    steps = [s for s, _ in recorder.losses]
    losses = [v for _, v in recorder.losses]
    finite = [v for v in losses if math.isfinite(v)]
    dead = [v for k, v in recorder.last.items() if tags.is_dead_fraction(k)]
    return {
        "steps": (steps[-1] + 1) if steps else 0,
        "final_loss": losses[-1] if losses else None,
        "min_loss": min(finite) if finite else None,
        "steps_to_converge": steps_to_converge(steps, losses, cfg.summary.converge_below,
                                               cfg.summary.converge_relative),
        "dead_fraction_final": sum(dead) / len(dead) if dead else None,
        "grad_global_norm_final": recorder.last.get(tags.GLOBAL_NORM),
    }


def _hparams(cfg: DictConfig, overrides: list[str]) -> dict:
    """The run's config for TensorBoard's HParams tab: the overridden keys and the main choices."""
    choices = HydraConfig.get().runtime.choices
    params = {group: choices.get(group) for group in ("model", "dataset", "loss", "optimizer")}
    params.update({"optimizer.lr": cfg.optimizer.get("lr"), "seed": cfg.seed})
    for key, value in filter(None, map(split_override, overrides)):
        selected = OmegaConf.select(cfg, key, default=value)
        params[key] = selected if isinstance(selected, int | float | str | bool) else str(selected)
    return params


def run(cfg: DictConfig) -> float:
    # Lightning's own use of a torch API it deprecated: not the user's to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    record = RunRecord(run_dir, overrides, cfg.get("seed"))
    if multirun:
        # One line per finished run instead of Lightning's banners and progress bars.
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        torch.set_num_threads(max(1, int(os.environ.get(sweep.THREADS_ENV, torch.get_num_threads()))))

    try:
        _check_top_level(cfg)
        parts = build(cfg)
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
        resume_step = checkpoint_step(ckpt_path)
        # Creates nothing on disk until training starts.
        logger = TensorBoardLogger(save_dir=str(run_dir), name=TB_DIR, version="", default_hp_metric=False)
        recorder = StepRecorder(run_dir, logger, cfg.log.flush_every_n_steps, cfg.log.flush_every_s,
                                purge_from_step=resume_step)
        telemetry = _telemetry(cfg, recorder)
        checkpoint = LastCheckpoint(run_dir / CKPT_DIR / LAST_CKPT, cfg.checkpoint.every_n_steps)
        # Order matters: telemetry hands its numbers to the recorder, which writes the step
        # before the checkpoint saves the recorder's state.
        callbacks = [c for c in (telemetry, recorder) if c is not None] + [checkpoint]
        trainer = _trainer(cfg, logger, callbacks, multirun)
        module = GradwatchModule(parts.model, parts.loss_fn, parts.optimizer)
    except Exception as err:  # noqa: BLE001 - refused before any work, with one line
        # A ConfigError names its key; anything else (a _target_ that does not exist, a Trainer
        # option Lightning refuses) is reported by its first line.
        message = str(err) if isinstance(err, ConfigError) else f"the config cannot be built: {_first_line(err)}"
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        record.write(status="failed", error=message)
        if multirun:
            sweep.report_run(hydra_cfg, record.data)
            return math.nan
        print(f"gradwatch: {message}", file=sys.stderr)
        sys.exit(2)

    with SigtermGuard() as sigterm:
        status, error, exit_code, wall_s = _fit(trainer, module, parts, ckpt_path, record, sigterm)
        sigterm.defer()  # from here on a SIGTERM waits until the results are written
        recorder.close()  # however fit ended (Lightning skips teardown hooks after an exception)

        results = outcome(recorder, cfg)
        if recorder.divergence is not None and status == "completed":
            status, error = "diverged", recorder.divergence["reason"]
        logger.log_hyperparams(_hparams(cfg, record.data["overrides"]), metrics={
            f"hparams/{k}": (math.nan if v is None else float(v))
            for k, v in results.items() if k in ("final_loss", "min_loss", "steps_to_converge", "dead_fraction_final")
        }, step=results["steps"])  # at the end: a later resume purges it with the steps it replaces
        logger.finalize("success" if status == "completed" else status)
        record.write(status=status, error=error, wall_s=round(wall_s, 6), **results,
                     diverged_at=(recorder.divergence or {}).get("step"))
        if multirun:
            sweep.report_run(hydra_cfg, record.data)
        elif status in ("completed", "diverged"):
            print(f"gradwatch: {status} after {results['steps']} steps, final loss {results['final_loss']}, "
                  f"run folder {run_dir}")
        if status == "interrupted" or sigterm.received:
            sys.exit(exit_code or EXIT_SIGTERM)
        if status == "failed" and not multirun:
            sys.exit(1)
        if status == "failed":
            return math.nan
        # Sweepers minimise this: a diverged run is infinitely bad, not missing.
        final_loss = finite_or_none(results["final_loss"])
        return math.inf if final_loss is None else final_loss


def _fit(trainer, module, parts, ckpt_path, record: RunRecord, sigterm: SigtermGuard):
    """Train, and say how it ended: (status, error, exit code, seconds in fit)."""
    status, error, exit_code = "completed", None, 0
    started = time.perf_counter()
    try:
        record.write(status="running")
        trainer.fit(module, train_dataloaders=parts.batches, ckpt_path=ckpt_path, weights_only=True)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Lightning turns Ctrl-C into SystemExit(1) and SIGTERM into SIGTERMException.
        status = "interrupted"
        exit_code = EXIT_SIGTERM if trainer.received_sigterm or sigterm.received else EXIT_SIGINT
        error = f"interrupted at step {trainer.global_step} ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - a failing run is recorded, never takes its sweep down
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("run failed")
    return status, error, exit_code, time.perf_counter() - started
