"""GradientTelemetry in a plain Lightning script under DDP (two CPU processes, gloo): every process
computes, rank 0 writes, and the numbers equal a one-process run on the same global batches."""

import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow  # starts Lightning's DDP launcher

SCRIPT = '''
import sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from gradwatch import GradientTelemetry


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.l1, self.relu, self.l2 = nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)
        with torch.no_grad():
            self.l1.bias[:4] = -0.8  # units that fire on some samples only

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.l2(self.relu(self.l1(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


out, devices = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
# Lightning's DistributedSampler (shuffled, seed 0) deals a permutation out in turn: two shards of 16
# make the batch of 32 that one process gets from the same permutation.
if devices == 1:
    same = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    batches = torch.utils.data.DataLoader(data, batch_size=32, sampler=same)
else:
    batches = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                     logger=TensorBoardLogger(out, name="run", version=0), callbacks=[GradientTelemetry()],
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Net(), train_dataloaders=batches)
'''


def scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_two_processes_write_once_what_one_process_writes(tmp_path):
    script = tmp_path / "own_ddp.py"
    script.write_text(SCRIPT)
    for devices in (1, 2):
        result = subprocess.run([sys.executable, str(script), str(tmp_path / f"p{devices}"), str(devices)],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = scalars(tmp_path / "p1" / "run" / "version_0"), scalars(tmp_path / "p2" / "run" / "version_0")
    assert len(list((tmp_path / "p2" / "run" / "version_0").glob("*.steps"))) == 1  # rank 0's file only
    assert set(one) == set(two) and "act/relu/dead_fraction" in two and "update/l1.weight/ratio" in two
    assert sorted(two["train/loss"]) == [0, 1, 2, 3] and sorted(two["act/relu/dead_fraction_epoch"]) == [1, 3]
    for tag, steps in one.items():
        assert sorted(two[tag]) == sorted(steps), tag
        for step, value in steps.items():
            assert two[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step)
