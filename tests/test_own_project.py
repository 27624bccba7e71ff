"""GradientTelemetry as a plain callback in a Lightning project of one's own (issue 13), and in
half-precision runs: the logged numbers against torch's own, read back with EventAccumulator."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradwatch import GradientTelemetry
from gradwatch.config.errors import ConfigError


class SmallCNN(pl.LightningModule):
    """A conv net with a Linear head; ReLU modules registered in the opposite order to their calls."""

    def __init__(self, optimizer: str = "sgd"):
        super().__init__()
        self.head_relu = nn.ReLU()  # called second
        self.conv_relu = nn.ReLU()  # called first
        self.conv = nn.Conv2d(1, 4, 3)
        self.hidden = nn.Linear(4 * 6 * 6, 8)
        self.head = nn.Linear(8, 3)
        self.optimizer = optimizer
        with torch.no_grad():
            self.conv.bias[1] = -1e4  # channel 1 never fires

    def features(self, x):
        return self.conv_relu(self.conv(x))

    def forward(self, x):
        return self.head(self.head_relu(self.hidden(self.features(x).flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def batch(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(16, 1, 8, 8, dtype=dtype), torch.randint(0, 3, (16,))


def fit(tmp_path, module, steps=2, **trainer_args):
    logger = TensorBoardLogger(str(tmp_path), name="own")
    trainer = pl.Trainer(max_steps=steps, callbacks=[GradientTelemetry()], logger=logger, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_args)
    data = torch.utils.data.DataLoader([batch()], batch_size=None)
    trainer.fit(module, train_dataloaders=data)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}, acc


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_own_lightning_module_gets_torch_numbers(tmp_path, optimizer):
    torch.manual_seed(1)
    module = SmallCNN(optimizer)
    replay = copy.deepcopy(module)
    scalars, acc = fit(tmp_path, module)
    # Step 0 replayed by hand: gradients, the update, and the dead channels.
    x, y = batch()
    opt = replay.configure_optimizers()
    nn.functional.cross_entropy(replay(x), y).backward()
    before = {n: p.detach().clone() for n, p in replay.named_parameters()}
    for name, p in replay.named_parameters():
        assert scalars[f"grad/{name}/mean"][0] == pytest.approx(p.grad.mean().item(), rel=1e-5, abs=1e-9)
        assert scalars[f"grad/{name}/norm"][0] == pytest.approx(p.grad.norm().item(), rel=1e-5)
    opt.step()
    for name, p in replay.named_parameters():
        expected = ((p.detach().double() - before[name].double()).norm() / before[name].double().norm()).item()
        assert scalars[f"update/{name}/ratio"][0] == pytest.approx(expected, rel=1e-4), name
    with torch.no_grad():
        h = replay.features(x)
    fired = (h > 0).any(dim=3).any(dim=2).any(dim=0)
    assert fired.tolist() == [True, False, True, True]
    assert scalars["act/conv_relu/dead_fraction"][1] == (~fired).sum().item() / 4 == 0.25
    assert scalars["act/conv_relu/zero_fraction"][1] == pytest.approx((h == 0).double().mean().item(), abs=1e-7)
    assert sorted(scalars["train/loss"]) == [0, 1]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-mixed"])
def test_half_precision_run_counts_exactly(tmp_path, precision):
    torch.manual_seed(2)
    module = SmallCNN()
    with torch.no_grad():
        module.conv.bias[0] = -0.2  # some zeros, not all
    replay = copy.deepcopy(module)
    scalars, _ = fit(tmp_path, module, steps=1, precision=precision)
    x, _ = batch()
    dtype = {"bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    with torch.no_grad():
        if precision == "bf16-true":
            h = replay.to(torch.bfloat16).features(x.to(torch.bfloat16))
        else:
            with torch.autocast("cpu", dtype=dtype):
                h = replay.features(x)
    dead = ((h > 0).sum(dim=(0, 2, 3)) == 0).sum().item() / 4
    zero = (h == 0).sum().item() / h.numel()
    assert scalars["act/conv_relu/dead_fraction"][0] == dead
    assert scalars["act/conv_relu/zero_fraction"][0] == pytest.approx(zero, rel=1e-7)  # float32 in TensorBoard


def test_without_any_logger_says_so_once(tmp_path, caplog):
    trainer = pl.Trainer(max_steps=1, callbacks=[GradientTelemetry()], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SmallCNN(), train_dataloaders=torch.utils.data.DataLoader([batch()], batch_size=None))
    lines = [r.getMessage() for r in caplog.records if "GradientTelemetry" in r.getMessage()]
    assert len(lines) == 1 and "has no logger" in lines[0]


@pytest.mark.parametrize(("kwargs", "name"), [({"every_n_steps": 0}, "every_n_steps"),
                                              ({"on_nonfinite": "ignore"}, "on_nonfinite"),
                                              ({"histograms_every_n_steps": -1}, "histograms_every_n_steps"),
                                              ({"activations": "yes"}, "activations"),
                                              ({"update_ratio": 1}, "update_ratio")])
def test_arguments_checked_by_name(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        GradientTelemetry(**kwargs)


def test_import_gradwatch_stays_light():
    import subprocess
    import sys

    code = "import sys, gradwatch; assert 'lightning' not in sys.modules and 'torch' not in sys.modules, 'heavy'"
    subprocess.run([sys.executable, "-c", code], check=True)
