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
    """Ctrl-C, or SIGTERM in a distributed run: training stops at the end of the step, in every
    process at the same step.

    A KeyboardInterrupt raised wherever the signal lands could stop a step half done (the
    weights updated, the step not counted, some parameters stepped and others not), and the
    checkpoint saved then would resume to other numbers than an uninterrupted run; in a
    distributed run, a signal that raised in one process while another waits in a collective
    (the gradient all-reduce, the loss mean) would leave that one waiting forever. Here a signal
    only sets a flag, and Lightning stops at the end of a step, so the checkpoint, the logs and
    run.json end on the same step. A second Ctrl-C in a one-process run stops at once
    (KeyboardInterrupt; `LastCheckpoint` then keeps its last checkpoint rather than one of a step
    half done). A one-process run's SIGTERM keeps its own handling (Lightning stops at the next
    step's start).

    Several processes agree a step late, without waiting: each step's end sends its flag in a
    non-blocking all-reduce (sum) and reads the one the last step's end sent, which is done by
    then (on a GPU, through pinned memory behind an event recorded after it: the host never
    waits for the step in flight). Every process reads the same sums at the same step ends, so
    they stop together, one step after the first signal was seen.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._together = False  # several processes: they agree at each step's end
        self._sent: tuple | None = None  # the last step end's flag on its way: (work, host value, event)

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT and not self._together:
            raise KeyboardInterrupt  # Ctrl-C again: the user will not wait for the step to end
        self.signal = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._together = trainer.world_size > 1
        signals = (signal.SIGINT, signal.SIGTERM) if self._together else (signal.SIGINT,)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # ignored by the shell (a background job)
            signals = signals[1:]
        self._previous = {sig: signal.signal(sig, self._note) for sig in signals}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._previous:
            return
        if self._together:
            stop = self._agreed(pl_module.device)
        else:
            stop = self.signal is not None
        if stop:
            trainer.should_stop = True
            self.signal = self.signal or signal.SIGINT  # another process was signalled

    def _agreed(self, device: torch.device) -> bool:
        """Whether some process had been signalled by the last step's end (its sum, read now),
        after sending this step's flag."""
        flag = torch.full((1,), int(self.signal is not None), dtype=torch.int32, device=device)  # no copy to wait for
        work = dist.all_reduce(flag, op=dist.ReduceOp.SUM, async_op=True)
        if flag.is_cuda:
            work.wait()  # the current stream waits for the sum, the host does not
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            sent = (None, host, done)
        else:
            sent = (work, flag, None)
        last, self._sent = self._sent, sent
        return last is not None and self._read(last) > 0

    @staticmethod
    def _read(sent: tuple) -> int:
        work, value, done = sent
        if work is not None:
            work.wait()
        if done is not None:
            done.synchronize()  # recorded a step ago: long done
        return int(value[0])

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self._sent is not None:  # every process ends here: the last flag's all-reduce is finished first
            sent, self._sent = self._sent, None
            self._read(sent)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        self._sent = None  # not waited for: another process may be gone
