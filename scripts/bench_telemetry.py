"""What gradient telemetry costs per training step, against no telemetry, measured in the same run.

Models (batch 256, full batch), each with SGD and with Adam:
- MLP 2-[256]x3-1: 8 parameter tensors, 3 ReLU layers;
- deep narrow MLP, 50 Linear layers of width 32: 100 parameter tensors, 49 ReLU layers.
Variants:
- pipeline: `python train.py` with telemetry at every step, against `telemetry=off`;
- own project: a plain LightningModule and `Trainer(callbacks=[GradientTelemetry()],
  logger=TensorBoardLogger(...))`, against the same Trainer without the callback;
- naive (`--naive`): a Python loop over parameters with `.item()` per statistic and `self.log`.
Per-step time is measured step by step (from one training batch's start to the next) and
summarised by its 25th percentile over every step of the repeats: a shared machine only ever
adds time, in bursts, so a low percentile is the steadiest estimate; variants are interleaved.
One torch thread: on a 2-core machine shared with other work, two OpenMP threads make the same
fit vary 10x. Also times the TensorBoard event
writers alone (tensorboard's SummaryWriter against gradwatch.storage.events.EventFile).

    OMP_NUM_THREADS=1 python scripts/bench_telemetry.py [--quick] [--naive]
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch.api import train  # noqa: E402
from gradwatch.storage.events import EventFile  # noqa: E402
from gradwatch.storage.record import read_run  # noqa: E402

HIDDEN = {
    "MLP 2-[256]x3-1": [256] * 3,
    "deep narrow 50x32": [32] * 49,
}
OPTIMIZERS = {"sgd": (torch.optim.SGD, 1e-4), "adam": (torch.optim.Adam, 1e-4)}
COMMON = ["model=mlp", "dataset=sum_x1_x2", "dataset.size=256", "trainer.enable_progress_bar=false",
          "checkpoint.every_n_steps=1000000"]


class NaiveTelemetry(pl.Callback):
    """The baseline: one `.item()` per statistic and one `self.log` per value."""

    def __init__(self, recorder=None, every_n_steps: int = 1, **_):
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every_n_steps:
            return
        total = 0.0
        for name, p in pl_module.model.named_parameters():
            g = p.grad
            pl_module.log(f"grad/{name}/mean", g.mean().item())
            pl_module.log(f"grad/{name}/std", g.std().item() if g.numel() > 1 else 0.0)
            pl_module.log(f"grad/{name}/zero_fraction", (g == 0).float().mean().item())
            norm = g.norm().item()
            pl_module.log(f"grad/{name}/norm", norm)
            pl_module.log(f"grad/{name}/abs_max", g.abs().max().item())
            pl_module.log(f"grad/{name}/nonfinite", float((~torch.isfinite(g)).sum().item()))
            total += norm * norm
        pl_module.log("grad/global_norm", total**0.5)


STEP_TIMES: list[float] = []


class StepTimer(pl.Callback):
    """Seconds from each training batch's start to the next one's, into STEP_TIMES."""

    def __init__(self):
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None and trainer.global_step > 5:  # past the first steps' warm-up
            STEP_TIMES.append(now - self._last)
        self._last = now


class TimedTrainer(pl.Trainer):
    """The pipeline's Trainer (`trainer._target_`) with a StepTimer added."""

    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), StepTimer()], **kwargs)


def pipeline_times(model: str, optimizer: str, variant: str, steps: int, folder: Path) -> list[float]:
    overrides = {
        "off": ["telemetry=off"],
        "on": ["telemetry.every_n_steps=1"],
        "naive": [f"telemetry._target_={__name__}.NaiveTelemetry", "telemetry.every_n_steps=1"],
    }[variant]
    hidden = "model.hidden=[" + ",".join(map(str, HIDDEN[model])) + "]"
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    lr = OPTIMIZERS[optimizer][1]
    STEP_TIMES.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        train([*COMMON, hidden, f"optimizer={optimizer}", f"optimizer.lr={lr}", *overrides,
               f"trainer.max_steps={steps}", f"trainer._target_={__name__}.TimedTrainer"], run_dir)
    record = read_run(run_dir)
    assert record["status"] == "completed", record
    return list(STEP_TIMES)


class OwnModule(pl.LightningModule):
    """A user's own LightningModule: no gradwatch in it."""

    def __init__(self, hidden: list[int], optimizer: str):
        super().__init__()
        sizes = [2, *hidden, 1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        factory, lr = OPTIMIZERS[self.optimizer]
        return factory(self.parameters(), lr=lr)


def own_project_times(model: str, optimizer: str, variant: str, steps: int, folder: Path) -> list[float]:
    try:
        from gradwatch import GradientTelemetry
    except ImportError:  # before issue 13
        return []
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    x = torch.rand(256, 2) * 2 - 1
    batches = torch.utils.data.DataLoader([(x, x.sum(dim=1, keepdim=True))], batch_size=None)
    callbacks = [GradientTelemetry(), StepTimer()] if variant == "on" else [StepTimer()]
    trainer = pl.Trainer(max_steps=steps, logger=TensorBoardLogger(str(folder), name="own"), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    STEP_TIMES.clear()
    trainer.fit(OwnModule(HIDDEN[model], optimizer), train_dataloaders=batches)
    return list(STEP_TIMES)


def bench_models(steps: int, repeats: int, naive: bool, folder: Path) -> None:
    print(f"\nper-step time, 25th percentile over {repeats} x {steps} steps (ratio against no telemetry)")
    print(f"{'model':20s} {'optimizer':9s} {'variant':16s} {'ms/step':>9s} {'ratio':>8s}")
    harnesses = {"pipeline": pipeline_times, "own project": own_project_times}
    for model in HIDDEN:
        for optimizer in OPTIMIZERS:
            cases = [(h, v) for h in harnesses for v in ("off", "on")]
            if naive:
                cases.append(("pipeline", "naive"))
            times: dict[tuple, list[float]] = {c: [] for c in cases}
            for _ in range(repeats):
                for case in cases:
                    times[case] += harnesses[case[0]](model, optimizer, case[1], steps, folder)
            per_step = {c: float(np.percentile(t, 25)) for c, t in times.items() if t}
            for (harness, variant), t in per_step.items():
                ratio = t / per_step[(harness, "off")]
                print(f"{model:20s} {optimizer:9s} {harness + ' ' + variant:16s} {t * 1e3:9.3f} {ratio:7.3f}x",
                      flush=True)


def bench_writers(n_scalars: int, events: int, folder: Path) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    names = [f"grad/{i}.weight/mean" for i in range(n_scalars)]
    values = [float(i) for i in range(n_scalars)]
    writer = SummaryWriter(log_dir=str(folder / f"sw{n_scalars}"))
    file_writer = writer._get_file_writer()
    started = time.perf_counter()
    for step in range(events):
        summary = Summary(value=[Summary.Value(tag=n, simple_value=v) for n, v in zip(names, values, strict=True)])
        file_writer.add_summary(summary, step)
    writer.flush()
    tensorboard_s = (time.perf_counter() - started) / events
    writer.close()
    ours = EventFile(folder / f"ef{n_scalars}")
    started = time.perf_counter()
    for step in range(events):
        ours.add_scalars(step, names, values)
    ours.flush()
    ours_s = (time.perf_counter() - started) / events
    ours.close()
    print(f"event writer, {n_scalars:4d} scalars/event: SummaryWriter {tensorboard_s * 1e6:8.1f} us, "
          f"EventFile {ours_s * 1e6:7.1f} us, ratio {tensorboard_s / ours_s:6.1f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one repeat")
    parser.add_argument("--naive", action="store_true", help="also time the naive .item()/self.log logger")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 51, 700):
            bench_writers(n, 200 if args.quick else 1000, Path(tmp))
        steps = args.steps or (60 if args.quick else 300)
        bench_models(steps, args.repeats or (1 if args.quick else 3), args.naive, Path(tmp))


if __name__ == "__main__":
    main()
