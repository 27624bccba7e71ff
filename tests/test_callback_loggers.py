"""GradientTelemetry into Lightning loggers other than TensorBoard: the same numbers through
`trainer.loggers`, read back from each logger's own files with its own reader, against torch's
gradients recomputed in float64; and the deferred read (a step's numbers read when a later step
ends), forced on the CPU."""

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

from gradwatch import GradientTelemetry
from gradwatch.telemetry.recorder import StepRecorder

QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
         "enable_checkpointing": False}
STATS = ("mean", "std", "zero_fraction", "norm", "abs_max", "nonfinite")


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.l1, self.relu, self.l2 = nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)

    def forward(self, x):
        return self.l2(self.relu(self.l1(x)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def data():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(10, 3, generator=generator), torch.randint(0, 2, (10,), generator=generator))
            for _ in range(3)]


def step0_expected(module: Net) -> dict[str, float]:
    """Step 0's gradient statistics, by torch in float64, on an untouched copy."""
    replay = copy.deepcopy(module).double()
    x, y = data()[0]
    nn.functional.cross_entropy(replay(x.double()), y).backward()
    expected = {}
    for name, p in replay.named_parameters():
        g = p.grad
        values = (g.mean(), g.std(), (g == 0).double().mean(), g.norm(), g.abs().max(), (~torch.isfinite(g)).sum())
        expected.update({f"grad/{name}/{stat}": float(v) for stat, v in zip(STATS, values, strict=True)})
    expected["grad/global_norm"] = math.sqrt(sum(p.grad.pow(2).sum().item() for p in replay.parameters()))
    return expected


def fit(logger, steps: int = 3, **telemetry) -> Net:
    torch.manual_seed(1)
    module = Net()
    expected = step0_expected(module)
    trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=[GradientTelemetry(**telemetry)], **QUIET)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data(), batch_size=None))
    return expected


def test_csv_logger_alone_gets_torch_numbers(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    expected = fit(logger)
    table = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    assert sorted(table["step"]) == [0, 1, 2]  # one row a step: one log_metrics call with every tag
    row = table.set_index("step").loc[0]
    for tag, value in expected.items():
        assert row[tag] == pytest.approx(value, rel=1e-6, abs=1e-7), tag  # float32 gradients
    assert {"train/loss", "lr", "act/relu/dead_fraction", "update/l1.weight/ratio"} <= set(table.columns)


def test_mlflow_logger_alone_gets_torch_numbers(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, as asked of it
    from lightning.pytorch.loggers import MLFlowLogger

    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="gradwatch", tracking_uri=uri)
    expected = fit(logger)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    for tag, value in expected.items():
        history = client.get_metric_history(logger.run_id, tag)
        assert sorted(m.step for m in history) == [0, 1, 2], tag
        (first,) = [m.value for m in history if m.step == 0]
        assert first == pytest.approx(value, rel=1e-6, abs=1e-7), tag  # float32 gradients


class Spy(Logger):
    """A logger that notes, for each step it is given, the global step the Trainer was at."""

    def __init__(self):
        super().__init__()
        self.trainer = None
        self.calls: list[tuple[int, int, dict]] = []

    @property
    def name(self):
        return "spy"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, self.trainer.global_step, dict(metrics)))


class Clock(pl.Callback):
    def __init__(self, spy: Spy):
        self.spy = spy

    def on_fit_start(self, trainer, pl_module):
        self.spy.trainer = trainer


@pytest.mark.parametrize("defer", [False, True])
def test_deferred_reads_write_a_step_when_a_later_one_ends_with_the_same_numbers(tmp_path, defer):
    """What a GPU does (numbers read a step late, at a flush and at the end of fit), forced on
    the CPU: the same numbers as reading at once, each step written once, in order."""
    written = {}
    for mode in (False, defer):
        torch.manual_seed(1)
        module, spy = Net(), Spy()
        recorder = StepRecorder(None, loggers=[spy], defer=mode, flush_every_n_steps=1000)
        trainer = pl.Trainer(max_steps=4, logger=False, callbacks=[Clock(spy), GradientTelemetry(recorder), recorder],
                             **QUIET)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data(), batch_size=None))
        written[mode] = spy.calls
    steps = [step for step, _, _ in written[defer]]
    assert steps == [0, 1, 2, 3]
    # Read at once, step s is written when it ends (global step s + 1); deferred, when the next ends.
    lag = 2 if defer else 1
    assert [at for _, at, _ in written[defer][:3]] == [s + lag for s in range(3)]
    for (_, _, now), (_, _, later) in zip(written[False], written[defer], strict=True):
        assert now.keys() == later.keys()
        assert np.array_equal(np.array(list(now.values())), np.array(list(later.values())))


def test_wandb_logger_offline_gets_torch_numbers(tmp_path, monkeypatch):
    """W&B offline: its run in this process (the client's own summary: the last value of each key)
    holds the last step's numbers, equal to torch's; its run file is written on the disk."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(1)
    module = Net()
    grads = {}

    class Last(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.double().clone() for n, p in module.named_parameters()})

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="gradwatch")
    trainer = pl.Trainer(max_steps=3, logger=logger, callbacks=[GradientTelemetry(), Last()], **QUIET)
    try:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data(), batch_size=None))
        summary = dict(logger.experiment.summary)
    finally:
        logger.experiment.finish()
    assert summary["trainer/global_step"] == 2
    for name, g in grads.items():
        assert summary[f"grad/{name}/norm"] == pytest.approx(g.norm().item(), rel=1e-6), name
        assert summary[f"grad/{name}/mean"] == pytest.approx(g.mean().item(), rel=1e-6, abs=1e-7), name
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
