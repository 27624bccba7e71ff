"""The step recorder: the one owner of a run's TensorBoard output, and of its parquet rows.

Telemetry hands its numbers to `add()`; the recorder adds the loss, the learning rate and the
module's `step_metrics` and writes everything once per step, so TensorBoard gets one event (not
one per tag) and nothing is logged through `LightningModule.log`. The layout, histograms, hparams
and text go into the same event file.
"""

import math
import time
from pathlib import Path
from typing import Protocol

import lightning.pytorch as pl
import numpy as np
import torch

from gradwatch.config.errors import ConfigError, check_int, is_number
from gradwatch.storage.events import EventFile, histogram_summary, hparams_summaries, layout_summary, text_summary
from gradwatch.storage.parquet import ParquetSink
from gradwatch.telemetry import tags
from gradwatch.telemetry.distributed import is_rank_zero, mean_over_processes, world

_HEAD = (tags.LOSS, tags.LR)


class Sink(Protocol):
    """Where a step's scalars go: `EventFile` (TensorBoard) and `ParquetSink`."""

    def write(self, step: int, names: tuple[str, ...], values: np.ndarray) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class StepRecorder(pl.Callback):
    """Records `train/loss`, `lr`, the module's `step_metrics` and whatever telemetry adds, every
    step, to one TensorBoard event file and (with `metrics_dir`) to parquet.

    Example::

        recorder = StepRecorder(run_dir / "tb", run_dir / "metrics")
        Trainer(callbacks=[GradientTelemetry(recorder), recorder], logger=False)

    Nothing is created on disk before training starts. The hooks work when another callback
    calls them directly (as a standalone `GradientTelemetry` does).

    Args:
        tb_dir: TensorBoard's folder for this run.
        metrics_dir: the parquet parts' folder; None writes TensorBoard only.
        flush_every_n_steps, flush_every_s: flush the sinks when either is reached.
        purge_from_step: on resume, drop what was logged at or after this step.
    """

    def __init__(self, tb_dir: Path, metrics_dir: Path | None = None, flush_every_n_steps: int = 100,
                 flush_every_s: float = 5.0, purge_from_step: int | None = None):
        check_int("log.flush_every_n_steps", flush_every_n_steps, minimum=1)
        if not is_number(flush_every_s) or not flush_every_s >= 0 or not math.isfinite(flush_every_s):
            raise ConfigError("log.flush_every_s", flush_every_s, "a number >= 0 (seconds)")
        self.tb_dir = Path(tb_dir)
        self.metrics_dir = None if metrics_dir is None else Path(metrics_dir)
        self.purge_from_step = purge_from_step
        self.events: EventFile | None = None
        self.sinks: list[Sink] = []
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._pending: list[tuple[tuple[str, ...], np.ndarray]] = []
        self._names: dict[tuple[int, ...], tuple[tuple[str, ...], tuple]] = {}
        self._metric_names: tuple[str, ...] = ()
        self._world_size: int | None = None  # the processes of this fit
        self._loss: torch.Tensor | None = None
        self._loss_step: int | None = None
        self._written_step: int | None = None
        # What the run's record needs at the end.
        self.losses: list[tuple[int, float]] = []
        # By the identity of each names tuple (hashing ~700 tags a step costs more), with the tuple.
        self._latest: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}
        self.divergence: dict | None = None

    # -- what telemetry calls -------------------------------------------------------------
    def add(self, names: tuple[str, ...], values: np.ndarray) -> None:
        """Values for this step's event; `names` is best the same tuple object every step."""
        self._pending.append((names, values))

    def add_layout(self, layout: dict) -> None:
        """TensorBoard's custom-scalars layout (`tags.custom_scalars_layout`); the latest one counts."""
        self._open().add_summary(0, layout_summary(layout))

    def add_histogram(self, tag: str, values, step: int) -> None:
        self._open().add_summary(step, histogram_summary(tag, values))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._open().add_summary(step, text_summary(tag, text))

    def add_hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        """The HParams tab's row: `hparams` (name -> bool, number or str) and `metrics` (tag -> value)."""
        events = self._open()
        for summary in hparams_summaries(hparams, list(metrics)):
            events.add_summary(step, summary)
        names = tuple(metrics)
        events.write(step, names, np.array([metrics[n] for n in names], dtype=np.float64))

    @property
    def last(self) -> dict[str, float]:
        """The latest value of every tag recorded so far."""
        return {n: float(v) for names, values in self._latest.values() for n, v in zip(names, values, strict=True)}

    def diverge(self, step: int, reason: str, trainer: "pl.Trainer", stop: bool = True) -> None:
        """Mark the run diverged (the first time counts); `stop` ends training after this step."""
        if self.divergence is None:
            self.divergence = {"step": step, "reason": reason}
        if stop:
            trainer.should_stop = True

    # -- Lightning hooks --------------------------------------------------------------------
    def _open(self) -> EventFile:
        """The sinks, created on first use (a hook or an `add_*` call)."""
        if self.events is None and not is_rank_zero():
            self.events = _Discard()  # a distributed run's other processes write nothing
        if self.events is None:
            self.events = EventFile(self.tb_dir, purge_from_step=self.purge_from_step)
            self.sinks = [self.events]
            if self.metrics_dir is not None:
                self.sinks.append(ParquetSink(self.metrics_dir, purge_from_step=self.purge_from_step))
        return self.events

    def on_fit_start(self, trainer, pl_module) -> None:
        self._world_size = None
        self._open()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss, self._loss_step = loss.detach(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write_step(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # The optimizer may have stepped before the interruption reached on_train_batch_end:
        # the step is written, so the logs match the checkpoint saved at this global_step.
        if self._loss_step is not None and trainer.global_step > self._loss_step:
            self._write_step(trainer, pl_module)
        self.flush()

    def close(self) -> None:
        """Flush the sinks and close them; the caller does it once fit has returned."""
        self.flush()
        for sink in self.sinks:
            sink.close()

    # -- checkpointed state -------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # A checkpoint never gets ahead of the logs: a resume from it purges the steps after it,
        # so everything before it must already be on disk.
        self.flush()

    def state_dict(self) -> dict:
        return {
            "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2),
            "latest_names": [list(names) for names, _ in self._latest.values()],
            "latest_values": [torch.from_numpy(np.asarray(v, dtype=np.float64)) for _, v in self._latest.values()],
            "divergence": self.divergence,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses = [(int(s), float(v)) for s, v in state_dict["losses"].tolist()]
        # Only the loss and learning rate carry over: telemetry values describe steps this run
        # may not log again (telemetry off, or a new run folder).
        self._latest = {id(_HEAD): (_HEAD, values.numpy()) for names, values
                        in zip(state_dict.get("latest_names", []), state_dict.get("latest_values", []), strict=True)
                        if tuple(names) == _HEAD}
        self.divergence = state_dict.get("divergence")

    # -- writing ------------------------------------------------------------------------------
    def _head(self, trainer, pl_module) -> list[tuple[tuple[str, ...], np.ndarray]]:
        """The loss, the learning rate and the module's step metrics, with one transfer to the host."""
        metrics = getattr(pl_module, "step_metrics", None) or {}
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
        if self._world_size is None:  # once a fit: the processes are set up before it starts
            self._world_size = world()[1]
        if not metrics and self._world_size == 1:  # the loss alone: one transfer, no stack (~5 tensor operations less)
            self._metric_names = ()
            return [(_HEAD, np.array([float(self._loss), lr]))]
        if tuple(metrics) != self._metric_names:
            self._metric_names = tuple(metrics)
        tensors = [self._loss.reshape(()).to(torch.float64)]
        tensors += [value.detach().reshape(()).to(device=self._loss.device, dtype=torch.float64)
                    for value in metrics.values()]
        # The mean over processes (a distributed run): the loss of the global batch.
        values = mean_over_processes(torch.stack(tensors)).cpu().numpy()
        head = [(_HEAD, np.array([values[0], lr]))]
        if self._metric_names:
            head.append((self._metric_names, values[1:]))
        return head

    def _write_step(self, trainer, pl_module) -> None:
        step = self._loss_step
        if step is None or self._loss is None or step == self._written_step:
            return
        groups = [*self._head(trainer, pl_module), *self._pending]
        # Keyed by the tuples' identities (hashing ~700 tags a step costs more); the cache keeps
        # the tuples alive, so an id is never reused for another tuple.
        key = tuple(id(names) for names, _ in groups)
        cached = self._names.get(key)
        if cached is None:
            if len(self._names) > 64:  # a caller making new tuples each step: do not grow
                self._names.clear()
            parts = tuple(names for names, _ in groups)
            cached = self._names[key] = tuple(n for part in parts for n in part), parts
        names = cached[0]
        values = np.concatenate([v for _, v in groups])

        self._open()
        for sink in self.sinks:
            sink.write(step, names, values)
        self._written_step = step
        self._pending = []
        self._loss, self._loss_step = None, None
        loss_value = float(values[0])
        self.losses.append((step, loss_value))
        for group in groups:
            self._latest[id(group[0])] = group
        if len(self._latest) > 64:  # new tuples of the same tags: keep the latest of each
            by_names = {names: values for names, values in self._latest.values()}
            self._latest = {id(names): (names, values) for names, values in by_names.items()}
        if not math.isfinite(loss_value):
            self.diverge(step, f"non-finite loss ({loss_value}) at step {step}", trainer)

        if (step + 1) % self.flush_every_n_steps == 0 or time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()
        self._last_flush = time.monotonic()


class _Discard:
    """The event file of a process that does not write (every rank but 0)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
