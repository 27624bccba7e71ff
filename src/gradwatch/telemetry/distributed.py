"""Distributed runs (`trainer.strategy=ddp trainer.devices=N`): one global batch, N equal shards.

Every process runs the same code; these helpers are the only places where processes talk to each
other. Outside a process group each is the identity, so a one-process run pays nothing.

    >>> shard((torch.arange(6.0), torch.arange(6.0)), rank=1, world_size=2)[0].tolist()
    [3.0, 4.0, 5.0]
"""

import signal
import threading

import lightning.pytorch as pl
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """This process's equal, contiguous share of a global batch (the batch size divides evenly:
    checked before training starts)."""
    if world_size == 1:
        return batch
    size = len(batch[0]) // world_size
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over processes (a copy; the input is left alone)."""
    _, world_size = world()
    if world_size == 1:
        return values
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size


def is_rank_zero() -> bool:
    """Whether this process writes the run's files and prints. Known before the process group
    exists: Lightning's launcher gives every other process its rank in the environment."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def combine_unit_counts(per_unit: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A layer's per-unit non-zero counts on this process's shard -> on the global batch: summed
    over processes (exact: float64 integers), with the number of shards. (ActivationStats'
    `combine`: a unit fired if its global count is > 0, i.e. it fired on some process.)"""
    _, world_size = world()
    if world_size == 1:
        return per_unit, 1
    total = per_unit.to(torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total, world_size


class StopTogether(pl.Callback):
    """Ctrl-C or SIGTERM in a distributed run: every process stops at the end of the same step.

    A signal that raised in one process while another waits in a collective (the gradient
    all-reduce, the loss mean) would leave that one waiting forever. Here a signal only sets a
    flag; at the end of each step the processes agree (any of them flagged) and Lightning stops
    them all there, so the checkpoint, the logs and run.json end on the same step. One-process
    runs keep the usual handling (nothing is installed).
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._previous and trainer.strategy.reduce_boolean_decision(self.signal is not None, all=False):
            trainer.should_stop = True
            self.signal = self.signal or signal.SIGINT  # another process was signalled

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
