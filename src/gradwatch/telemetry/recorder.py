"""The step recorder: the one owner of a run's TensorBoard output, its parquet rows, and what goes
to any other Lightning logger.

Telemetry hands its numbers to `add()`; the recorder adds the loss, the learning rate and the
module's `step_metrics` and writes everything once per optimizer step, so TensorBoard gets one
event (not one per tag), every other logger one `log_metrics` call, and nothing is logged through
`LightningModule.log`. The layout, histograms, hparams and text go into the same event file.

A step's numbers may still be on their way from the device (`Readback`): on a GPU they are copied
to pinned host memory without waiting, and read when a later step ends, at a flush, a checkpoint
or the end of fit; on a CPU they are read at once.
"""

import logging
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import OmegaConf

from gradwatch.config.checks import check
from gradwatch.config.cli import CONF_DIR, PRIMARY
from gradwatch.storage.events import EventFile, histogram_summary, hparams_summaries, layout_summary, text_summary
from gradwatch.storage.names import JoinedNames
from gradwatch.storage.parquet import ParquetSink
from gradwatch.telemetry import tags
from gradwatch.telemetry.distributed import is_rank_zero, mean_over_processes, world

log = logging.getLogger(__name__)

# The flush cadence's one home: the `log` keys of the primary config.
LOG_DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{PRIMARY}.yaml").log)
_HEAD = (tags.LOSS, tags.LR)
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_NAMES_VALUES = operator.itemgetter(0, 1)
_LR = (tags.LR,)
# Batch ends a step's deferred numbers may wait for their copy before one waits for it: a host
# running ahead of the device (no sync in the loop) then reads them without stalling each step.
_MAX_LAG = 4


class Sink(Protocol):
    """Where a step's scalars go: `EventFile` (TensorBoard), `ParquetSink`, `LoggerSink`."""

    def write(self, step: int, names: tuple[str, ...], values: np.ndarray) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class LoggerSink:
    """Any Lightning logger (CSV, MLflow, W&B, ...) as a sink: one `log_metrics` call a step, with
    every tag of the step, as Lightning's own callbacks write through `trainer.loggers`."""

    def __init__(self, logger):
        self.logger = logger

    def write(self, step: int, names: tuple[str, ...], values: np.ndarray) -> None:
        self.logger.log_metrics(dict(zip(names, values.tolist(), strict=True)), step=step)

    def flush(self) -> None:
        self.logger.save()

    def close(self) -> None:
        self.logger.save()


class Readback:
    """One step's numbers on their way to the host: `parts` are (values, finish) pairs, values a
    device tensor or a numpy array already on the host, `finish` what turns them into the logged
    numbers (None: nothing). `result()` is the float64 vector of every part, finished, in order.

    With `defer`, the tensors are copied into host memory without blocking (pinned, on a GPU),
    behind a CUDA event: the copy is queued after the kernels that made them, so the device
    buffers may be reused by the next step, and `result()` waits only for what is not there yet.
    Without it (the CPU: nothing to wait for) the tensors are read at once, and the caller reads
    `result()` before the next step (numpy parts are not copied). `defer=None`: defer when the
    values are on a CUDA device.
    """

    __slots__ = ("_parts", "_host", "_event", "_result", "deferred")

    def __init__(self, parts: Sequence[tuple[object, Callable | None]], defer: bool | None = None):
        self._parts = list(parts)
        self._event = None
        self._result: np.ndarray | None = None
        self.deferred = False  # True until `result()` while the numbers may still be on their way
        tensors = [values.reshape(-1) for values, _ in self._parts if isinstance(values, torch.Tensor)]
        if not tensors:
            self._host = None
            return
        flat = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if defer is None:
            defer = flat.is_cuda
        self.deferred = bool(defer)
        if not defer:  # read at once by the caller: the host parts are read before any next step
            self._host = flat.cpu().numpy()
            return
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flat.device))  # the copy's stream, not the current device's
            self._host = host.numpy()
        else:  # deferred on the CPU (tests): a copy, as the pinned buffer is one
            self._host = flat.clone().numpy()
        # What is on the host already may be a buffer the next step overwrites (the CPU kernels').
        self._parts = [(values.copy() if isinstance(values, np.ndarray) else values, finish)
                       for values, finish in self._parts]

    def ready(self) -> bool:
        """Whether `result()` would not wait (the copy has reached the host)."""
        return self._event is None or self._event.query()

    def result(self) -> np.ndarray:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()  # read a step later, the copy is usually done: no wait then
                self._event = None
            parts, start = [], 0
            for values, finish in self._parts:
                if isinstance(values, torch.Tensor):
                    end = start + values.numel()
                    values, start = self._host[start:end], end
                parts.append(values if finish is None else finish(values))
            self._result = _joined(parts)
            self._parts = self._host = None
            self.deferred = False
        return self._result


def _joined(parts: list) -> np.ndarray:
    """The finished parts as one new float64 vector: never a view of a buffer the next step overwrites."""
    return np.concatenate(parts).astype(np.float64, copy=False) if len(parts) != 1 \
        else np.array(parts[0], dtype=np.float64)


def on_host(parts: Sequence[tuple[object, Callable | None]]) -> np.ndarray | None:
    """`Readback(parts).result()` when every part is a numpy array (the CPU kernels' numbers):
    the same new vector, finished at once, without a Readback object made and read each step;
    None when a part is a tensor (then a Readback it is)."""
    finished = []
    for values, finish in parts:
        if not isinstance(values, np.ndarray):
            return None
        finished.append(values if finish is None else finish(values))
    return _joined(finished)


class _Step:
    """What one optimizer step has gathered so far."""

    __slots__ = ("step", "backward_loss", "output_losses", "groups", "head", "closed_at", "deferred", "plain")

    def __init__(self, step: int):
        self.step = step
        self.backward_loss: torch.Tensor | None = None  # the sum of the losses backward() was given
        self.output_losses: list[torch.Tensor] = []  # training_step's, as Lightning reports them (automatic)
        self.groups: list[tuple[tuple[str, ...], object, Callable | None]] = []
        self.head: list[tuple[tuple[str, ...], object]] | None = None  # set when the step ends
        self.closed_at = -1  # the number of the batch end that closed it
        self.deferred = False  # some of its numbers may still be on their way to the host
        # Every value a numpy array and no `on_read` (the CPU): `_write` reads nothing. Kept
        # by `add` and `_close_steps`, which are the only ones to put values in.
        self.plain = True

    def ready(self) -> bool:
        """Whether every number of the step has reached the host (reading them would not wait)."""
        parts = [values for _, values in self.head or ()] + [values for _, values, _ in self.groups]
        return all(isinstance(values, np.ndarray) or values.ready() for values in parts)


class StepRecorder(pl.Callback):
    """Records `train/loss`, `lr`, the module's `step_metrics` and whatever telemetry adds, once per
    optimizer step, to one TensorBoard event file, to parquet (with `metrics_dir`) and to any
    other Lightning logger (`loggers`).

    Example::

        recorder = StepRecorder(run_dir / "tb", run_dir / "metrics")
        Trainer(callbacks=[GradientTelemetry(recorder), recorder], logger=False)

    Nothing is created on disk before training starts. The hooks work when another callback
    calls them directly (as a standalone `GradientTelemetry` does).

    A step is the optimizer step it belongs to: with gradient accumulation its loss is the mean
    of its micro-batches' losses (the sum of what Lightning reports for each, which it divides
    by their number), written when the step's last micro-batch ends; with manual optimization
    each `manual_backward` loss counts at the global step it was computed at (a GAN's two
    optimizers: two steps, two losses).

    Args:
        tb_dir: TensorBoard's folder for this run; None: no event file.
        metrics_dir: the parquet parts' folder; None writes no parquet.
        flush_every_n_steps, flush_every_s: flush the sinks when either is reached (defaults: the
            `log` keys of conf/train.yaml).
        purge_from_step: on resume, drop what was logged at or after this step (None: the
            step of the checkpoint Lightning resumes from, if any).
        loggers: other Lightning loggers that get every step's numbers (`LoggerSink`).
        on_nonfinite_loss: `stop` (end training, the run diverged) or `warn` (one line, go on);
            None: stop without a line of its own (the pipeline reports it).
        defer: read device numbers a step late (None: on CUDA devices only).
    """

    def __init__(self, tb_dir: Path | None, metrics_dir: Path | None = None,
                 flush_every_n_steps: int = LOG_DEFAULTS["flush_every_n_steps"],
                 flush_every_s: float = LOG_DEFAULTS["flush_every_s"], purge_from_step: int | None = None, *,
                 loggers: Sequence = (),
                 on_nonfinite_loss: str | None = None, defer: bool | None = None):
        check("log.flush_every_n_steps", flush_every_n_steps)
        check("log.flush_every_s", flush_every_s)
        self.tb_dir = None if tb_dir is None else Path(tb_dir)
        self.metrics_dir = None if metrics_dir is None else Path(metrics_dir)
        self.purge_from_step = purge_from_step
        self.loggers = list(loggers)
        self.on_nonfinite_loss = on_nonfinite_loss
        self.defer = defer
        self.events: EventFile | None = None
        self.sinks: list[Sink] = []
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._steps: dict[int, _Step] = {}  # gathered, not yet written, in step order
        self._current: int | None = None  # the step of the last backward
        self._batch_ends = 0
        self._names = JoinedNames()
        self._metric_names: tuple[str, ...] = ()
        self._world_size: int | None = None  # the processes of this fit
        self._trainer = None
        self._scaler = None
        self._plain_module = None  # a module whose `step_metrics` can be read from its __dict__ (this fit's)
        self._loss_said = False  # a non-finite loss was said this fit
        self._written_step: int | None = None
        # What the run's record needs at the end.
        self.losses: list[tuple[int, float]] = []
        # By the identity of each names tuple (hashing ~700 tags a step costs more), with the tuple.
        self._latest: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}
        self.divergence: dict | None = None

    # -- what telemetry calls -------------------------------------------------------------
    def add(self, names: tuple[str, ...], values, step: int | None = None,
            on_read: Callable[[np.ndarray], None] | None = None) -> None:
        """Values for a step's event (default: the step of the last backward): a numpy array, or a
        `Readback` still on its way; `on_read(values)` is called when they are read. `names` is
        best the same tuple object every step."""
        if step is None:
            step = 0 if self._current is None else self._current
        record = self._steps.get(step) or self._step(step)  # a _Step is always true (no __len__)
        record.groups.append((names, values, on_read))
        if on_read is not None or not isinstance(values, np.ndarray):
            record.plain = False
            if not isinstance(values, np.ndarray) and values.deferred:
                record.deferred = True

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
    def _open(self):
        """The sinks, created on first use (a hook or an `add_*` call)."""
        if self.events is None and not is_rank_zero():
            self.events = _Discard()  # a distributed run's other processes write nothing
        if self.events is None:
            if self.tb_dir is not None:
                self.events = EventFile(self.tb_dir, purge_from_step=self.purge_from_step)
                self.sinks = [self.events]
            else:
                self.events = _Discard()
            if self.metrics_dir is not None:
                self.sinks.append(ParquetSink(self.metrics_dir, purge_from_step=self.purge_from_step))
            self.sinks += [LoggerSink(logger) for logger in self.loggers]
        return self.events

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Resumed from a checkpoint: what was logged after it is dropped (TensorBoard, parquet).
        if self.purge_from_step is None and self.events is None:
            self.purge_from_step = int(checkpoint.get("global_step", 0))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._world_size = None
        self._loss_said = False
        self._trainer = trainer
        # 16-mixed hands `on_before_backward` the loss times the scaler's scale.
        self._scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        # A module whose class defines no `step_metrics` holds them, if ever, in its __dict__
        # (set there by nn.Module.__setattr__, a dict being no parameter, buffer or module):
        # read there each step, not through getattr, which for a module without them goes
        # through nn.Module.__getattr__ and raises and catches an AttributeError (~1 us a step).
        plain = isinstance(getattr(pl_module, "__dict__", None), dict) and not hasattr(type(pl_module), "step_metrics")
        self._plain_module = pl_module if plain else None
        self._open()

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._current = step = trainer.global_step
        record = self._steps.get(step) or self._step(step)
        loss = loss.detach()
        scaler = self._scaler
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            loss = loss / scaler._scale  # unscaled on the device: no wait
        record.backward_loss = loss if record.backward_loss is None else record.backward_loss + loss

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch_ends += 1
        if self._current is not None and getattr(pl_module, "automatic_optimization", False):
            loss = outputs.get("loss") if isinstance(outputs, dict | Mapping) else outputs
            if isinstance(loss, torch.Tensor):
                record = self._steps.get(self._current) or self._step(self._current)
                record.output_losses.append(loss.detach() if loss.requires_grad else loss)
        self._close_steps(trainer, pl_module)
        self._write_steps(later_than=self._batch_ends)

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # The optimizer may have stepped before the interruption reached on_train_batch_end:
        # the step is written, so the logs match the checkpoint saved at this global_step.
        self._close_steps(trainer, pl_module)
        self.flush()

    def close(self) -> None:
        """Flush the sinks and close them; the caller does it once fit has returned. What is
        not written by then (a step the optimizer never took) is dropped."""
        self.flush()
        for sink in self.sinks:
            sink.close()
        self._steps.clear()
        self._trainer = self._scaler = self._plain_module = None

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
    def _step(self, step: int) -> _Step:
        record = self._steps.get(step)
        if record is None:
            record = self._steps[step] = _Step(step)
        return record

    def _close_steps(self, trainer, pl_module) -> None:
        """Steps the optimizer has taken (global_step is past them) get their loss, learning rate
        and step metrics, still on the device where they are."""
        taken = trainer.global_step
        for record in self._steps.values():
            if record.head is None and record.step < taken:
                record.head = head = self._head(trainer, pl_module, record)
                record.closed_at = self._batch_ends
                if not isinstance(head[0][1], np.ndarray):  # the head's groups are all arrays or all not
                    record.plain = False
                    if head[0][1].deferred:
                        record.deferred = True

    def _head(self, trainer, pl_module, record: _Step) -> list:
        """The loss, the learning rate and the module's step metrics: one readback."""
        metrics = (pl_module.__dict__.get("step_metrics") if pl_module is self._plain_module
                   else getattr(pl_module, "step_metrics", None)) or {}
        optimizers = trainer.optimizers
        lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan
        if record.output_losses:
            # Lightning's are divided by the micro-batches of a step: their sum is the mean loss.
            losses = record.output_losses
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).double().sum()
        else:
            loss = record.backward_loss
        if loss is None:  # no backward this step (telemetry only)
            return [(_LR, np.array([lr]))]
        if self._world_size is None:  # once a fit: the processes are set up before it starts
            self._world_size = world()[1]
        if not metrics and self._world_size == 1 and not self.defer and not loss.is_cuda:
            self._metric_names = ()  # the loss alone, on the host: no stack (~5 tensor operations less)
            return [(_HEAD, np.array([float(loss), lr]))]
        if tuple(metrics) != self._metric_names:
            self._metric_names = tuple(metrics)
        tensors = [loss.reshape(()).to(torch.float64)]
        tensors += [value.detach().reshape(()).to(device=loss.device, dtype=torch.float64)
                    for value in metrics.values()]
        # The mean over processes (a distributed run): the loss of the global batch.
        values = Readback([(mean_over_processes(torch.stack(tensors)), None)], self.defer)
        head = [(_HEAD, _WithLr(values, lr, 0, 1))]
        if self._metric_names:
            head.append((self._metric_names, _WithLr(values, None, 1, None)))
        return head

    def _write_steps(self, later_than: int | None = None) -> None:
        """Write the closed steps in order; with `later_than`, a step whose numbers are still on
        their way is left for a later batch end (so reading them does not wait)."""
        for step in list(self._steps):
            record = self._steps[step]
            if record.head is None:
                break  # not taken yet: the steps after it wait too (their order is kept)
            if later_than is not None and record.deferred and (
                    record.closed_at >= later_than
                    or record.closed_at > later_than - _MAX_LAG and not record.ready()):
                break  # still on its way: a later batch end reads it (at most _MAX_LAG ends later)
            del self._steps[step]
            self._write(record)

    def _write(self, record: _Step) -> None:
        step = record.step
        if step == self._written_step:
            return
        if record.plain:  # every value on the host already (the CPU): nothing to read or call back
            groups = record.head + list(map(_NAMES_VALUES, record.groups))
        else:
            groups = []
            for names, values in record.head:
                groups.append((names, values.result() if not isinstance(values, np.ndarray) else values))
            for names, values, on_read in record.groups:
                if not isinstance(values, np.ndarray):
                    values = values.result()
                if on_read is not None:
                    on_read(values)
                groups.append((names, values))
        names = self._names.join(list(map(_FIRST, groups)))  # map, not a comprehension: no frame
        values = np.concatenate(list(map(_SECOND, groups)))

        self._open()
        for sink in self.sinks:
            sink.write(step, names, values)
        self._written_step = step
        for group in groups:
            self._latest[id(group[0])] = group
        if len(self._latest) > 64:  # new tuples of the same tags: keep the latest of each
            by_names = {names: values for names, values in self._latest.values()}
            self._latest = {id(names): (names, values) for names, values in by_names.items()}
        if groups[0][0] is _HEAD:
            loss_value = float(groups[0][1][0])
            self.losses.append((step, loss_value))
            if not math.isfinite(loss_value):
                self._nonfinite_loss(step, loss_value)

        if (step + 1) % self.flush_every_n_steps == 0 or time.monotonic() - self._last_flush > self.flush_every_s:
            self._flush_sinks()

    def _nonfinite_loss(self, step: int, value: float) -> None:
        policy = self.on_nonfinite_loss
        reason = f"non-finite loss ({value}) at step {step}"
        if self._trainer is None:
            return
        first = not self._loss_said
        self._loss_said = True
        self.diverge(step, reason, self._trainer, stop=policy != "warn")
        if not first:  # one line a fit: a run whose loss stays NaN does not repeat it every step
            return
        if policy == "warn":
            log.warning("GradientTelemetry: %s; logged, training goes on (on_nonfinite=warn)", reason)
        elif policy == "stop":
            log.warning("GradientTelemetry: %s; training stopped after step %d (on_nonfinite=stop)",
                        reason, self._trainer.global_step - 1)

    def flush(self) -> None:
        """Write every step the optimizer has taken (reading what is on its way), then flush the sinks."""
        self._write_steps()
        self._flush_sinks()

    def _flush_sinks(self) -> None:
        for sink in self.sinks:
            sink.flush()
        self._last_flush = time.monotonic()


class _WithLr:
    """A slice of the head's readback (the loss with the learning rate after it, or the step
    metrics), read with it."""

    __slots__ = ("readback", "lr", "start", "stop")

    def __init__(self, readback: Readback, lr: float | None, start: int, stop: int | None):
        self.readback, self.lr, self.start, self.stop = readback, lr, start, stop

    @property
    def deferred(self) -> bool:
        return self.readback.deferred

    def ready(self) -> bool:
        return self.readback.ready()

    def result(self) -> np.ndarray:
        values = self.readback.result()[self.start:self.stop]
        return values if self.lr is None else np.append(values, self.lr)


class _Discard:
    """The event file of a process that does not write (every rank but 0), or of no TensorBoard."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
