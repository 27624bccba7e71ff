"""The LightningModule: a network, a loss and an optimizer, all taken from config."""

from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn

from gradwatch.telemetry import tags
from gradwatch.telemetry.distributed import shard, world

# Losses whose outputs are class scores, and how a prediction is read from them (see `accuracy`).
_MULTICLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_BINARY_LOSSES = {nn.BCEWithLogitsLoss: 0.0, nn.BCELoss: 0.5}  # loss -> decision threshold on the output


def accuracy(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The share of correct predictions as a detached 0-dim tensor (no host sync), or None for a
    loss that is not a classification loss (MSELoss...).

    CrossEntropyLoss / NLLLoss: argmax over dim 1 of `out` against the class index `y`, or against
    argmax of `y` when `y` holds class probabilities (one-hot). BCEWithLogitsLoss / BCELoss: every
    output is a yes/no prediction, `out > 0` (logits) or `out > 0.5` (probabilities), against `y >= 0.5`.

    >>> float(accuracy(nn.CrossEntropyLoss(), torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])))
    0.5
    >>> accuracy(nn.MSELoss(), torch.zeros(2, 1), torch.zeros(2, 1)) is None
    True
    """
    with torch.no_grad():
        if isinstance(loss_fn, _MULTICLASS_LOSSES):
            target = y.argmax(dim=1) if y.shape == out.shape else y
            return (out.argmax(dim=1) == target).float().mean()
        threshold = next((t for kind, t in _BINARY_LOSSES.items() if isinstance(loss_fn, kind)), None)
        if threshold is None:
            return None
        return ((out > threshold) == (y >= 0.5)).float().mean()


class GradwatchModule(pl.LightningModule):
    """Trains `model` on (x, y) batches with `loss_fn`; `optimizer` is a partial taking parameters.

    Example::

        module = GradwatchModule(nn.Sequential(nn.Linear(2, 1)), nn.MSELoss(),
                                 functools.partial(torch.optim.SGD, lr=0.01))
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self._optimizer_factory = optimizer
        self._classifies = isinstance(loss_fn, (*_MULTICLASS_LOSSES, *_BINARY_LOSSES))
        # Per-step extra scalars (tag -> detached 0-dim tensor) that the StepRecorder writes with
        # the loss: `train/accuracy` for a classification loss, nothing otherwise.
        self.step_metrics: dict[str, torch.Tensor] = {}
        self._shard = (0, 1)  # (rank, world size): each process trains on its share of a batch

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets `_current_fx_name` around every hook, dozens of times a step, and
        # nn.Module.__setattr__ costs more per call than a seed model's whole forward pass
        # (scripts/bench_step.py). It is a plain string, so it can skip the Parameter/Module checks.
        if name == "_current_fx_name":
            self.__dict__[name] = value
            return
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        self._shard = world()

    def training_step(self, batch, batch_idx):
        # A batch is the global batch; in a distributed run this process takes its equal share.
        x, y = shard(batch, *self._shard)
        out = self.model(x)
        if self._classifies:
            self.step_metrics[tags.ACCURACY] = accuracy(self.loss_fn, out, y)
        return self.loss_fn(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer_factory(self.model.parameters())
