"""`<run dir>/checkpoints/last.ckpt`: saved every N steps, at the end, and when a run is interrupted.

Lightning's ModelCheckpoint with `save_top_k=0` does not write `last.ckpt` when training ends,
and OnExceptionCheckpoint makes `fit(ckpt_path=None)` resume from `last` silently; this callback
does exactly the three saves a resumable run needs, through `trainer.save_checkpoint`.
"""

from pathlib import Path

import lightning.pytorch as pl

from gradwatch.config.errors import check_int


class LastCheckpoint(pl.Callback):
    """Keeps one resumable checkpoint up to date.

    Example::

        Trainer(callbacks=[LastCheckpoint(run_dir / "checkpoints" / "last.ckpt", every_n_steps=100)])
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path = Path(path)
        self.every_n_steps = check_int("checkpoint.every_n_steps", every_n_steps, minimum=1)
        self._saved_step: int | None = None

    def _save(self, trainer: pl.Trainer) -> None:
        if self._saved_step == trainer.global_step:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Lightning writes it atomically (temp file, then rename); the full state, to resume.
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._save(trainer)
