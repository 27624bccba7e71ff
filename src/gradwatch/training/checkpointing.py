"""`<run dir>/checkpoints/last.ckpt`: saved every N steps, at the end, and when a run is interrupted.

Lightning's ModelCheckpoint with `save_top_k=0` does not write `last.ckpt` when training ends,
and OnExceptionCheckpoint makes `fit(ckpt_path=None)` resume from `last` silently; this callback
does exactly the three saves a resumable run needs, through `trainer.save_checkpoint`.
"""

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from gradwatch.config.checks import check
from gradwatch.config.errors import ConfigError, first_line
from gradwatch.storage.paths import RunPaths


class LastCheckpoint(pl.Callback):
    """Keeps one resumable checkpoint up to date.

    Example::

        Trainer(callbacks=[LastCheckpoint(RunPaths(run_dir).last_ckpt, every_n_steps=100)])
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path = Path(path)
        self.every_n_steps = check("checkpoint.every_n_steps", every_n_steps)
        self._saved_step: int | None = None
        self._in_step = False  # between a batch's start and its end

    def _save(self, trainer: pl.Trainer) -> None:
        if self._saved_step == trainer.global_step:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Lightning writes it atomically (temp file, then rename); the full state, to resume.
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A Ctrl-C that stopped a step half way (a second one: `StopTogether`): its weights may be
        # updated while the step is not counted; the last checkpoint stays, so a resume from it
        # gives the numbers an uninterrupted run gives.
        if isinstance(exception, KeyboardInterrupt) and self._in_step:
            return
        self._save(trainer)


def resolve_ckpt_path(value: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `ckpt_path` names: None, `last` (this run folder's) or a file."""
    if value is None:
        return None
    path = RunPaths(run_dir).last_ckpt if value == "last" else Path(str(value))
    if not path.is_file():
        raise ConfigError("ckpt_path", value, f"null, `last` or an existing checkpoint file (no file at {path})")
    return path


def read_checkpoint(path: Path, value: str | None = None) -> dict:
    """A checkpoint loaded with `weights_only=True`; a file that is not one is a ConfigError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        int(checkpoint["global_step"])
        checkpoint["state_dict"].items()
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same answer
        reason = first_line(err)[:120]
        raise ConfigError("ckpt_path", value or str(path), f"a checkpoint written by gradwatch ({reason})") from None
    return checkpoint


def check_fits(checkpoint: dict, model: nn.Module, value: str, prefix: str = "model.") -> None:
    """A ConfigError unless the checkpoint's weights have the configured model's names and shapes."""
    saved = {k[len(prefix):]: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = next((k for k in wanted if k in saved and saved[k] != wanted[k]), None)
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    problem = "; ".join(filter(None, [
        bad and f"{bad} has shape {list(saved[bad])} there, {list(wanted[bad])} in the configured model",
        missing and f"no {', '.join(missing)} in the checkpoint",
        extra and f"{', '.join(extra)} not in the model"]))
    if problem:
        raise ConfigError("ckpt_path", value, f"a checkpoint of the configured model ({problem})")
