"""A progress bar over training steps.

Lightning's bars restart every epoch; with full-batch data an epoch is one step, so they flash a
new bar per step. This one counts optimizer steps against `max_steps` and shows the loss.
"""

import sys

from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


class StepProgressBar(ProgressBar):
    """One tqdm bar for the whole fit: `Trainer(callbacks=[StepProgressBar()])`."""

    def __init__(self, loss_every_n_steps: int = 10):
        super().__init__()
        self.loss_every_n_steps = loss_every_n_steps
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._bar = tqdm(total=total, initial=trainer.global_step, desc="training", unit="step",
                         disable=not self._enabled, dynamic_ncols=True, file=sys.stderr, mininterval=0.2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        if self.loss_every_n_steps and trainer.global_step % self.loss_every_n_steps == 0 and outputs is not None:
            self._bar.set_postfix(loss=f"{float(outputs['loss']):.6g}", refresh=False)
        self._bar.update(trainer.global_step - self._bar.n)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()
