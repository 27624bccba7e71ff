"""The step recorder: each step's scalars as one TensorBoard event and one parquet row group.

Telemetry hands its numbers to `add()`; the recorder adds the loss and learning rate and writes
everything once per step, so TensorBoard gets one event (not one per tag) and nothing is logged
through `LightningModule.log`.
"""

import math
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from gradwatch.config.errors import check_int
from gradwatch.storage.events import EventFile
from gradwatch.storage.parquet import ParquetSink
from gradwatch.telemetry import tags

TB_DIR = "tb"  # <run dir>/tb: TensorBoard's folder (DESIGN.md, run folder)
_HEAD = (tags.LOSS, tags.LR)


class StepRecorder(pl.Callback):
    """Records `train/loss`, `lr` and whatever telemetry adds, every step, to TensorBoard and parquet.

    Example::

        logger = TensorBoardLogger(run_dir, name=TB_DIR, version="")
        Trainer(callbacks=[StepRecorder(run_dir, logger)], logger=logger)

    Nothing is created on disk before training starts.

    Args:
        run_dir: the run folder; the parquet parts go to `<run_dir>/metrics/`.
        logger: a Lightning TensorBoardLogger; its SummaryWriter receives the events.
        flush_every_n_steps, flush_every_s: flush both sinks when either is reached.
        purge_from_step: on resume, drop parquet rows logged at or after this step.
    """

    def __init__(self, run_dir: Path, logger, flush_every_n_steps: int = 100, flush_every_s: float = 5.0,
                 purge_from_step: int | None = None):
        check_int("log.flush_every_n_steps", flush_every_n_steps, minimum=1)
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.purge_from_step = purge_from_step
        self.sink: ParquetSink | None = None
        self.events: EventFile | None = None
        self.flush_every_n_steps = flush_every_n_steps
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._pending: list[tuple[tuple[str, ...], np.ndarray]] = []
        self._names: dict[tuple, tuple[str, ...]] = {}
        self._loss: torch.Tensor | None = None
        self._loss_step: int | None = None
        # What the run's record needs at the end.
        self.losses: list[tuple[int, float]] = []
        self._latest: dict[tuple[str, ...], np.ndarray] = {}
        self.divergence: dict | None = None

    @property
    def writer(self):
        """The TensorBoard logger's SummaryWriter, for histograms, layouts and hparams."""
        return self.logger.experiment

    # -- what telemetry calls -------------------------------------------------------------
    def add(self, names: tuple[str, ...], values: np.ndarray) -> None:
        """Values for this step's event; `names` is best the same tuple object every step."""
        self._pending.append((names, values))

    @property
    def last(self) -> dict[str, float]:
        """The latest value of every tag recorded so far."""
        return {n: float(v) for names, values in self._latest.items() for n, v in zip(names, values, strict=True)}

    def diverge(self, step: int, reason: str, trainer: "pl.Trainer", stop: bool = True) -> None:
        """Mark the run diverged (the first time counts); `stop` ends training after this step."""
        if self.divergence is None:
            self.divergence = {"step": step, "reason": reason}
        if stop:
            trainer.should_stop = True

    # -- Lightning hooks --------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self.events = EventFile(self.run_dir / TB_DIR, purge_from_step=self.purge_from_step)
        self.sink = ParquetSink(self.run_dir, purge_from_step=self.purge_from_step)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss, self._loss_step = loss.detach(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write_step(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # The optimizer may have stepped before the interruption reached on_train_batch_end.
        if self._loss_step is not None and trainer.global_step > self._loss_step:
            self._write_step(trainer)
        self.flush()

    def close(self) -> None:
        """Flush both sinks and close the event file; the caller does it once fit has returned."""
        if self.events is not None:
            self.flush()
            self.events.close()

    # -- checkpointed state: the loss curve so far, so a resumed run reports on all of it ----
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # A checkpoint never gets ahead of the logs: a resume from it purges the steps after it,
        # so everything before it must already be on disk.
        self.flush()

    def state_dict(self) -> dict:
        return {
            "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2),
            "latest_names": [list(names) for names in self._latest],
            "latest_values": [torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in self._latest.values()],
            "divergence": self.divergence,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses = [(int(s), float(v)) for s, v in state_dict["losses"].tolist()]
        # Only the loss and learning rate carry over: telemetry values describe steps this run
        # may not log again (telemetry off, or a new run folder).
        self._latest = {tuple(names): values.numpy() for names, values
                        in zip(state_dict.get("latest_names", []), state_dict.get("latest_values", []), strict=True)
                        if tuple(names) == _HEAD}
        self.divergence = state_dict.get("divergence")

    # -- writing ------------------------------------------------------------------------------
    def _write_step(self, trainer) -> None:
        step, loss = self._loss_step, self._loss
        if step is None or loss is None:
            return
        loss_value = float(loss)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
        groups = [(_HEAD, np.array([loss_value, lr])), *self._pending]
        self._pending = []
        self._loss, self._loss_step = None, None
        key = tuple(names for names, _ in groups)
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = tuple(n for group in key for n in group)
        values = np.concatenate([v for _, v in groups])

        self.events.add_scalars(step, names, values)
        self.sink.write(step, names, values)
        self.losses.append((step, loss_value))
        self._latest.update(groups)
        if not math.isfinite(loss_value):
            self.diverge(step, f"non-finite loss ({loss_value}) at step {step}", trainer)

        if (step + 1) % self.flush_every_n_steps == 0 or time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.sink is None:
            return
        self.sink.flush()
        self.events.flush()
        self._last_flush = time.monotonic()
