"""One run: config -> objects -> Lightning fit -> TensorBoard, parquet, checkpoint and run.json.

`run(cfg)` returns a `RunResult` or raises: `ConfigError` for a value refused before any work,
`RunFailed` for a run that could not be built, failed or was interrupted (its record written).
It prints nothing and exits nothing: `train.py` and the sweep callback do.
"""

import logging
import os
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gradwatch.config.build import build, call_target
from gradwatch.config.errors import ConfigError, first_line, is_number
from gradwatch.config.overrides import override_values, readable
from gradwatch.storage.files import write_atomic
from gradwatch.storage.paths import RunPaths
from gradwatch.storage.record import RunRecord, read_run
from gradwatch.summary import findings as fx
from gradwatch.summary.outcome import Outcome
from gradwatch.summary.results import RunResults, read_results
from gradwatch.telemetry import tags
from gradwatch.telemetry.distributed import StopTogether, is_rank_zero
from gradwatch.telemetry.recorder import StepRecorder
from gradwatch.training.checkpointing import LastCheckpoint, check_fits, read_checkpoint, resolve_ckpt_path
from gradwatch.training.module import GradwatchModule
from gradwatch.training.progress import StepProgressBar

log = logging.getLogger(__name__)

# Exit codes: a refused command, a failed run, and interrupted runs as shells report signals.
EXIT_REFUSED, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143
HPARAMS_GROUPS = ("model", "dataset", "loss", "optimizer")


class RunFailed(Exception):
    """A run that did not finish: refused while being built (exit 2), failed (exit 1) or
    interrupted (130, 143). `str()` is the one line to show; `record` is what run.json holds."""

    def __init__(self, message: str, status: str, exit_code: int, record: dict | None = None):
        super().__init__(message)
        self.status, self.exit_code, self.record = status, exit_code, record or {}


@dataclass
class RunResult:
    """A run that trained to its end: `completed` or `diverged`."""

    status: str
    outcome: Outcome
    run_dir: Path
    record: dict
    exit_code: int = 0  # EXIT_SIGTERM when a SIGTERM arrived while the results were being written
    results: RunResults | None = None  # findings and verdict (also in `record`)

    @property
    def value(self) -> float:
        return self.outcome.value


def exit_code(err: BaseException) -> int:
    return err.exit_code if isinstance(err, RunFailed) else EXIT_REFUSED


class SigtermGuard:
    """SIGTERM for the whole run, not only Lightning's loop: it raises SystemExit, recorded as
    `interrupted` with exit code 143. While the training loop runs (`handover()`'s callback),
    Lightning stops at the end of the step instead, so the logs, the checkpoint and run.json
    agree on the step. `defer()` turns it into a flag once training is over, so the results
    still get written."""

    def __init__(self):
        self.received = False
        self._loop_handles = False
        self._previous = None
        self._installed = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "SigtermGuard":
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True
        if not self._loop_handles:
            raise SystemExit(EXIT_SIGTERM)

    def handover(self) -> pl.Callback:
        guard = self

        class _Handover(pl.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                guard._loop_handles = True

            def on_train_end(self, trainer, pl_module) -> None:
                guard._loop_handles = False

            def on_exception(self, trainer, pl_module, exception) -> None:
                guard._loop_handles = False

        return _Handover()

    def defer(self) -> None:
        self._loop_handles = True

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def quiet_lightning() -> None:
    """No Lightning banners or tips (`GPU available`, the litlogger tip, "`Trainer.fit` stopped"):
    gradwatch's own line says how the run went. Warnings and errors still show."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(threads: int) -> None:
    """torch's CPU threads for this process, whatever OMP_NUM_THREADS says: a float sum split over
    more threads rounds differently, so the thread count is part of what decides a run's numbers."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # torch allows it once, before any inter-op work (a second run in one process); it changes no number


def environment(trainer: pl.Trainer) -> dict:
    """What decides a run's numbers besides its config: run.json's `environment`."""
    device = trainer.strategy.root_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__, "lightning": pl.__version__,
            "device": str(device) if name is None else f"{device} ({name})", "processes": trainer.world_size,
            "precision": str(trainer.precision),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def relu_widths(model: torch.nn.Module) -> dict[str, int]:
    """{ReLU layer: its unit count} where the module just before it in its container says
    (`out_features`, `out_channels`), for the findings' `all 16 units of layer 1 dead`."""
    from gradwatch.telemetry.callback import relu_layers

    modules = dict(model.named_modules())
    widths = {}
    for name, _ in relu_layers(model):
        parent, _, index = name.rpartition(".")
        if not index.isdigit():
            continue
        before = modules.get(f"{parent}.{int(index) - 1}" if parent else str(int(index) - 1))
        width = getattr(before, "out_features", None) or getattr(before, "out_channels", None)
        if isinstance(width, int):
            widths[name] = width
    return widths


def _telemetry(cfg: DictConfig, recorder: StepRecorder):
    if not cfg.telemetry.enabled:
        return None
    node = {k: v for k, v in OmegaConf.to_container(cfg.telemetry, resolve=True).items() if k != "enabled"}
    try:
        return call_target(node, recorder=recorder)
    except ConfigError as err:
        raise ConfigError(f"telemetry.{err.key}", err.value, err.allowed) from None


def _check_processes(cfg: DictConfig, multirun: bool, samples: int, batch_size: int) -> None:
    """A distributed run splits every batch into equal shards, one per process, so that its
    numbers equal a one-process run's; it needs a batch size the processes divide."""
    devices = cfg.trainer.get("devices", 1)
    processes = devices if isinstance(devices, int) and not isinstance(devices, bool) else None
    if processes is None or processes <= 1:
        return
    if multirun and str(cfg.trainer.get("strategy", "auto")).startswith("ddp"):
        raise ConfigError("trainer.strategy", cfg.trainer.strategy,
                          "auto or a single device inside a sweep (Lightning's DDP launcher restarts the whole "
                          "command in each process; run distributed runs one at a time)")
    if batch_size % processes or (samples % batch_size) % processes:
        raise ConfigError("dataset.batch_size", cfg.dataset.get("batch_size"),
                          f"a batch size that {processes} processes (trainer.devices) share equally: every batch, "
                          f"the last of an epoch too ({samples} samples), a multiple of {processes}")


def _trainer(cfg: DictConfig, callbacks: list, multirun: bool):
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        # Telemetry and the loss curve count optimizer steps; accumulation would log a step twice.
        raise ConfigError("trainer.accumulate_grad_batches", accumulate, "1 (use a larger dataset.batch_size)")
    if multirun:
        trainer_cfg["enable_progress_bar"] = False
    elif trainer_cfg.get("enable_progress_bar", True) and is_rank_zero():
        callbacks = [*callbacks, StepProgressBar()]
    # The StepRecorder writes all of TensorBoard's output: Lightning gets no logger.
    return instantiate(trainer_cfg, logger=False, callbacks=callbacks, enable_checkpointing=False)


def hparams(cfg: DictConfig, overrides: list[str]) -> dict:
    """The run's config for TensorBoard's HParams tab: the main group choices by name, the
    learning rate, the seed and every overridden key with the value the run used."""
    choices = dict(HydraConfig.get().runtime.choices)
    params = {group: choices.get(group) for group in HPARAMS_GROUPS}
    params.update({"optimizer.lr": cfg.optimizer.get("lr"), "seed": cfg.seed})
    params.update(override_values(overrides, cfg, choices))
    return {k: (v if isinstance(v, bool | int | float | str) else readable(v) or str(v)) for k, v in params.items()}


@dataclass
class _Prepared:
    trainer: pl.Trainer
    module: GradwatchModule
    batches: object
    recorder: StepRecorder
    ckpt_path: Path | None
    stop: StopTogether


def _prepare(cfg: DictConfig, paths: RunPaths, multirun: bool, sigterm: "SigtermGuard") -> _Prepared:
    """Everything the fit needs, checked; writes nothing."""
    parts = build(cfg)  # every scalar key checked first (config.checks.check_config)
    set_threads(cfg.threads)
    _check_processes(cfg, multirun, len(parts.x), parts.batches.batch_size)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, paths.root)
    resume_step = None
    if ckpt_path is not None:
        checkpoint = read_checkpoint(ckpt_path, cfg.ckpt_path)
        check_fits(checkpoint, parts.model, cfg.ckpt_path)
        resume_step = int(checkpoint["global_step"])
    elif paths.metrics.is_dir() or paths.tb.is_dir():
        resume_step = 0  # a new run in a used folder replaces what was logged there
    recorder = StepRecorder(paths.tb, paths.metrics, cfg.log.flush_every_n_steps, cfg.log.flush_every_s,
                            purge_from_step=resume_step)
    telemetry = _telemetry(cfg, recorder)
    checkpoint_cb = LastCheckpoint(paths.last_ckpt, cfg.checkpoint.every_n_steps)
    # Order matters: telemetry hands its numbers to the recorder, which writes the step
    # before the checkpoint saves the recorder's state.
    stop = StopTogether()
    callbacks = [c for c in (telemetry, recorder) if c is not None] + [stop, checkpoint_cb, sigterm.handover()]
    trainer = _trainer(cfg, callbacks, multirun)
    module = GradwatchModule(parts.model, parts.loss_fn, parts.optimizer)
    return _Prepared(trainer, module, parts.batches, recorder, ckpt_path, stop)


def run(cfg: DictConfig) -> RunResult:
    # Lightning's own use of a torch API it deprecated: not the user's to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    hydra_cfg = HydraConfig.get()
    paths = RunPaths(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        previous = read_run(paths.root)
    except (OSError, ValueError):
        previous = None
    record = RunRecord(paths.root, overrides, cfg.get("seed"), enabled=is_rank_zero())
    quiet_lightning()

    with SigtermGuard() as sigterm:
        try:
            prepared = _prepare(cfg, paths, multirun, sigterm)
        except Exception as err:  # noqa: BLE001 - refused before any work, with one line
            # A ConfigError names its key; anything else (a _target_ that does not exist, a Trainer
            # option Lightning refuses) is reported by its first line.
            refusal = err if isinstance(err, ConfigError) else RunFailed(
                f"the config cannot be built: {first_line(err)}", "failed", EXIT_REFUSED)
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            if previous is None:  # a refused command leaves an existing run's record as it was
                record.write(status="failed", error=str(refusal))
            if isinstance(refusal, RunFailed):
                refusal.record = record.data
                raise refusal from err
            raise

        status, error, code, wall_s = _fit(prepared, record, sigterm)
        sigterm.defer()  # from here on a SIGTERM waits until the results are written
        try:
            return _finish(cfg, paths, prepared.recorder, record, previous, overrides, status, error, code,
                           wall_s, resumed=prepared.ckpt_path is not None, sigterm=sigterm,
                           units=relu_widths(prepared.module.model))
        except OSError as err:  # a full disk, a folder gone: every file written so far stays whole
            message = f"{first_line(err)} (while writing the results; the run was {status})"
            try:
                record.write(status="failed", error=message)
            except OSError:
                pass  # run.json keeps its last complete state
            raise RunFailed(message, "failed", EXIT_FAILED, record.data) from err


def _finish(cfg, paths: RunPaths, recorder: StepRecorder, record: RunRecord, previous: dict | None,
            overrides: list[str], status: str, error: str | None, code: int, wall_s: float, resumed: bool,
            sigterm: SigtermGuard, units: dict[str, int] | None = None) -> RunResult:
    """Outcome and findings from the run's parquet (as the summary reads them, with the same
    thresholds), the findings as TensorBoard text, the HParams row, run.json."""
    recorder.flush()  # however fit ended (Lightning skips teardown hooks after an exception)
    results = read_results(paths.root, fx.Thresholds.from_config(cfg), units)
    outcome, unreadable = results.outcome, results.unreadable
    if status == "completed" and (recorder.divergence is not None or outcome.diverged
                                  or results.verdict == "diverged"):
        status = "diverged"
        error = (recorder.divergence or {}).get("reason") or "a non-finite loss or gradient"
    if unreadable:
        error = "; ".join(filter(None, [error, *(f"metrics {p}" for p in unreadable)]))
    # After the last step: a later resume purges them with the steps it replaces.
    recorder.add_text("findings", fx.as_markdown(results.findings), step=outcome.steps)
    recorder.add_hparams(hparams(cfg, overrides),
                         {tags.hparam_metric(k): v for k, v in outcome.hparams_metrics().items()},
                         step=outcome.steps)
    recorder.close()
    if resumed and previous is not None and is_number(previous.get("wall_s")):
        wall_s += previous["wall_s"]  # a resumed run's time is the time of all its fits
    record.write(status=status, error=error, wall_s=round(wall_s, 6), **outcome.record(),
                 diverged_at=(recorder.divergence or {}).get("step"), **results.record())
    if status in ("failed", "interrupted"):
        raise RunFailed(error, status, code, record.data)
    return RunResult(status, outcome, paths.root, record.data, EXIT_SIGTERM if sigterm.received else 0,
                     results)


def _fit(prepared: _Prepared, record: RunRecord, sigterm: SigtermGuard):
    """Train, and say how it ended: (status, error, exit code, seconds in fit)."""
    status, error, code = "completed", None, 0
    trainer = prepared.trainer
    started = time.perf_counter()
    try:
        record.write(status="running", environment=environment(trainer))
        trainer.fit(prepared.module, train_dataloaders=prepared.batches, ckpt_path=prepared.ckpt_path,
                    weights_only=True)
        if prepared.stop.signal is not None:  # a distributed run, stopped together at a step's end
            status = "interrupted"
            code = EXIT_SIGTERM if prepared.stop.signal == signal.SIGTERM else EXIT_SIGINT
            error = f"interrupted at step {trainer.global_step} ({signal.Signals(prepared.stop.signal).name})"
    except (KeyboardInterrupt, SystemExit):
        # Lightning turns Ctrl-C into SystemExit(1) and SIGTERM into SIGTERMException: the line
        # names the signal, not the exception that carried it.
        status = "interrupted"
        code = EXIT_SIGTERM if trainer.received_sigterm or sigterm.received else EXIT_SIGINT
        error = f"interrupted at step {trainer.global_step} ({'SIGTERM' if code == EXIT_SIGTERM else 'SIGINT'})"
    except Exception as exc:  # noqa: BLE001 - a failing run is recorded, never takes its sweep down
        status, code = "failed", EXIT_FAILED
        error = _log_failure(exc, RunPaths(record.path.parent))
    return status, error, code, time.perf_counter() - started


def _log_failure(exc: BaseException, paths: RunPaths) -> str:
    """The failure's line; its traceback goes to the run's error log (and to the terminal with
    HYDRA_FULL_ERROR=1)."""
    text = "".join(traceback.format_exception(exc))
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(exc)
    try:
        write_atomic(paths.error_log, text.encode())
        where = f"traceback in {paths.error_log}"
    except OSError as err:
        where = f"no traceback written: {err.strerror or err}"
    return f"{first_line(exc)} ({where})"
