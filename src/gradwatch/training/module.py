"""The LightningModule: a network, a loss and an optimizer, all taken from config."""

from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn


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

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer_factory(self.model.parameters())
