"""TEMPORARY: the StepRecorder contract of HELPERS.md on top of today's recorder, for the telemetry
tests until the records branch (which implements it in recorder.py) is merged; then `install()`
does nothing and this file can go."""

import inspect
from pathlib import Path

import numpy as np

from gradwatch.storage.events import EventFile
from gradwatch.storage.parquet import ParquetSink
from gradwatch.telemetry import callback
from gradwatch.telemetry import recorder as rec


class _NoSink:
    def write(self, step: int, names: tuple[str, ...], values: np.ndarray) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ContractRecorder(rec.StepRecorder):
    """`StepRecorder(tb_dir, metrics_dir=None, ...)`: events in tb_dir, parquet only with metrics_dir."""

    def __init__(self, tb_dir, metrics_dir=None, flush_every_n_steps: int = 100, flush_every_s: float = 5.0,
                 purge_from_step: int | None = None):
        super().__init__(Path(tb_dir), None, flush_every_n_steps, flush_every_s, purge_from_step)
        self.tb_dir, self.metrics_dir, self._summary_writer = Path(tb_dir), metrics_dir, None

    @property
    def writer(self):
        if self._summary_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._summary_writer = SummaryWriter(str(self.tb_dir))
        return self._summary_writer

    def on_fit_start(self, trainer, pl_module) -> None:
        self.events = EventFile(self.tb_dir, purge_from_step=self.purge_from_step)
        self.sink = _NoSink() if self.metrics_dir is None else ParquetSink(Path(self.metrics_dir).parent,
                                                                           self.purge_from_step)

    def close(self) -> None:
        super().close()
        if self._summary_writer is not None:
            self._summary_writer.close()


def install() -> None:
    if "tb_dir" in inspect.signature(rec.StepRecorder.__init__).parameters:
        return  # the records branch is merged: the real contract is there
    if not hasattr(rec.StepRecorder, "add_layout"):
        rec.StepRecorder.add_layout = lambda self, layout: self.writer.add_custom_scalars(layout)
        rec.StepRecorder.add_histogram = lambda self, tag, values, step: self.writer.add_histogram(tag, values, step)
    callback.StepRecorder = ContractRecorder


install()
