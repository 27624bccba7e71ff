"""Ctrl-C in the middle of a step: training stops at the end of that step, and the checkpoint it
leaves is the state of a run that was never stopped, after as many steps (what a resume starts
from); a second Ctrl-C stops at once and leaves the last whole step's checkpoint."""

import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from gradwatch.telemetry.distributed import StopTogether
from gradwatch.training.checkpointing import LastCheckpoint

STEPS = 8


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class CtrlC(pl.Callback):
    """Sends itself SIGINT `times` times between the backward pass and the optimizer step of step
    `at`, as a user's Ctrl-C may land."""

    def __init__(self, at: int, times: int):
        self.at, self.times = at, times

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def batches():
    torch.manual_seed(1)
    x = torch.randn(64, 3)
    y = x.sum(dim=1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def fit(callbacks, steps: int = STEPS, ckpt_path=None) -> tuple[pl.Trainer, Net]:
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    net = Net()
    trainer.fit(net, train_dataloaders=batches(), ckpt_path=ckpt_path)
    return trainer, net


def state_after(steps: int, tmp_path) -> dict:
    """The checkpoint of a run of `steps` steps that was never stopped."""
    path = tmp_path / f"straight-{steps}.ckpt"
    fit([LastCheckpoint(path, every_n_steps=1000)], steps)
    return torch.load(path, weights_only=True)


def assert_same_state(got: dict, expected: dict) -> None:
    """The step, the weights and the optimizer's momentum buffers: what a resume starts from."""
    assert got["global_step"] == expected["global_step"]
    assert list(got["state_dict"]) == list(expected["state_dict"])
    for name, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), name
    buffers = [s["momentum_buffer"] for s in expected["optimizer_states"][0]["state"].values()]
    got_buffers = [s["momentum_buffer"] for s in got["optimizer_states"][0]["state"].values()]
    assert len(got_buffers) == len(buffers) == 4
    assert all(map(torch.equal, got_buffers, buffers))


@pytest.fixture(autouse=True)
def default_sigint():
    # The test process may have been started with SIGINT ignored (a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_step_stops_at_its_end_and_checkpoints_a_whole_step(tmp_path):
    path = tmp_path / "last.ckpt"
    stop = StopTogether()
    trainer, net = fit([CtrlC(at=3, times=1), stop, LastCheckpoint(path, every_n_steps=100)])
    assert stop.signal == signal.SIGINT and trainer.global_step == 4  # step 3 finished, then stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back after fit
    assert_same_state(torch.load(path, weights_only=True), state_after(4, tmp_path))


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_whole_steps_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt
        fit([CtrlC(at=5, times=2), StopTogether(), LastCheckpoint(path, every_n_steps=2)])
    # Step 5 stopped half way: not saved; the checkpoint of step 4 (every 2 steps) stays.
    assert_same_state(torch.load(path, weights_only=True), state_after(4, tmp_path))


def test_processes_agree_a_step_late_without_waiting_for_the_step_in_flight(tmp_path):
    # Several processes: each step's end sends its flag (a non-blocking all-reduce) and reads the
    # sum the last step's end sent. A process group of one (gloo) shows the order: a signal seen
    # at one step's end stops training at the next one's, and the last flag is read at the end.
    import torch.distributed as dist

    class Trainer:  # what `on_train_batch_end` reads and sets
        should_stop = False

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        stop, trainer, module = StopTogether(), Trainer(), Net()
        stop._previous, stop._together = {signal.SIGINT: signal.getsignal(signal.SIGINT)}, True  # as on_train_start
        stop.on_train_batch_end(trainer, module, None, None, 0)
        assert not trainer.should_stop and stop._sent is not None
        stop.signal = signal.SIGTERM  # signalled during the next step
        stop.on_train_batch_end(trainer, module, None, None, 1)
        assert not trainer.should_stop  # this step's end reads the last one's sum: 0
        stop.on_train_batch_end(trainer, module, None, None, 2)
        assert trainer.should_stop and stop.signal == signal.SIGTERM
        stop.on_train_end(trainer, module)
        assert stop._sent is None and stop._previous == {}
    finally:
        dist.destroy_process_group()
