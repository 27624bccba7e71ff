"""What gradient telemetry costs per training step, against no telemetry, measured in the same run.

Models (batch 256, full batch), each with SGD and with Adam:
- MLP 2-[256]x3-1: 8 parameter tensors, 3 ReLU layers;
- deep narrow MLP, 50 Linear layers of width 32: 100 parameter tensors, 49 ReLU layers.
Variants:
- pipeline: `python train.py` with telemetry at every step, against `telemetry=off`;
- own project: a plain LightningModule and `Trainer(callbacks=[GradientTelemetry()],
  logger=TensorBoardLogger(...))`, against the same Trainer without the callback;
- own CSV (`--csv`): the same with `CSVLogger` instead, a logger the callback writes through
  `log_metrics` (one call a step), against the same Trainer and CSVLogger without the callback;
- naive (`--naive`): a Python loop over parameters with `.item()` per statistic, handed to the
  pipeline's recorder (the pipeline runs Lightning with `logger=False`, so `self.log` would
  write nowhere);
- torch ops (`--torch-ops`): the pipeline with the statistics as torch operations
  (`stats.HOST_KERNELS = False`), the path GPUs and half precision take, instead of the fused
  CPU kernels.
Method (the machine is shared, so timings are noisy and only ever get longer):
- per run, the process CPU time (`time.process_time`, all threads) from the start of step
  `WARMUP` to the end of training, divided by the steps: every step's cost, flushes to
  TensorBoard and parquet included (a per-step percentile would leave out the periodic ones),
  and not the time the process waited for a core while other work ran;
- every variant of a model and optimizer runs `--repeats` times, interleaved (off, on, ..., in
  alternating order), and the fastest run of each is printed: interference adds CPU time too
  (caches, memory bandwidth), never removes it;
- the ratio is the median, over the repeats, of each run against the `telemetry=off` run of the
  same harness next to it (the machine's speed drifts over minutes; neighbours share it): the
  pipeline's off still records the loss and learning rate (TensorBoard and parquet); the own
  project's off is the same Trainer and TensorBoardLogger without the callback;
- wall-clock ratios are printed beside for reference.
One torch thread: on a 2-core machine shared with other work, two OpenMP threads make the same
fit vary 10x. Also times the TensorBoard event writers alone (tensorboard's SummaryWriter
against gradwatch.storage.events.EventFile), and the statistics alone on each model's tensors
outside a training step (warm caches): the fused CPU kernels against torch operations.

    OMP_NUM_THREADS=1 python scripts/bench_telemetry.py [--quick] [--naive] [--torch-ops]
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
from gradwatch.telemetry import stats  # noqa: E402

HIDDEN = {
    "MLP 2-[256]x3-1": [256] * 3,
    "deep narrow 50x32": [32] * 49,
}
OPTIMIZERS = {"sgd": (torch.optim.SGD, 1e-4), "adam": (torch.optim.Adam, 1e-4)}
COMMON = ["model=mlp", "dataset=sum_x1_x2", "dataset.size=256", "trainer.enable_progress_bar=false",
          "checkpoint.every_n_steps=1000000"]


class NaiveTelemetry(pl.Callback):
    """The baseline: one `.item()` per statistic, in a Python loop over the parameters, written
    through the pipeline's recorder (names as strings, values as a list)."""

    def __init__(self, recorder=None, every_n_steps: int = 1, **_):
        self.recorder = recorder
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every_n_steps:
            return
        total, names, values = 0.0, [], []
        for name, p in pl_module.model.named_parameters():
            g = p.grad
            norm = g.norm().item()
            names += [f"grad/{name}/{stat}" for stat in STATS]
            values += [g.mean().item(), g.std().item() if g.numel() > 1 else 0.0, (g == 0).float().mean().item(), norm,
                       g.abs().max().item(), float((~torch.isfinite(g)).sum().item())]
            total += norm * norm
        self.recorder.add((*names, "grad/global_norm"), np.array([*values, total**0.5]))


STATS = ("mean", "std", "zero_fraction", "norm", "abs_max", "nonfinite")
WARMUP = 5  # steps left out: the first steps allocate, fill caches and build templates
SPANS: list[tuple[float, float, int]] = []  # per run: CPU seconds, wall seconds, steps timed


class StepTimer(pl.Callback):
    """CPU and wall time from the start of step WARMUP to the end of training, into SPANS."""

    def __init__(self):
        self._start: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == WARMUP:
            self._start = time.process_time(), time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        cpu, wall = time.process_time(), time.perf_counter()
        SPANS.append((cpu - self._start[0], wall - self._start[1], trainer.global_step - WARMUP))


class TimedTrainer(pl.Trainer):
    """The pipeline's Trainer (`trainer._target_`) with a StepTimer added."""

    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), StepTimer()], **kwargs)


def pipeline_times(model: str, optimizer: str, variant: str, steps: int, folder: Path) -> tuple[float, float]:
    overrides = {
        "off": ["telemetry=off"],
        "on": ["telemetry.every_n_steps=1"],
        "naive": [f"telemetry._target_={__name__}.NaiveTelemetry", "telemetry.every_n_steps=1"],
        "torch ops": ["telemetry.every_n_steps=1"],
    }[variant]
    hidden = "model.hidden=[" + ",".join(map(str, HIDDEN[model])) + "]"
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    lr = OPTIMIZERS[optimizer][1]
    SPANS.clear()
    stats.HOST_KERNELS = variant != "torch ops"
    with contextlib.redirect_stdout(io.StringIO()):
        train([*COMMON, hidden, f"optimizer={optimizer}", f"optimizer.lr={lr}", *overrides,
               f"trainer.max_steps={steps}", f"trainer._target_={__name__}.TimedTrainer"], run_dir)
    record = read_run(run_dir)
    assert record["status"] == "completed", record
    return per_step()


def per_step() -> tuple[float, float]:
    """The last run's (CPU, wall) seconds per step. For the pipeline the span ends before the
    recorder's final flush (in `_finish`), as for the own project before the logger's."""
    (cpu, wall, steps), = SPANS
    return cpu / steps, wall / steps


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


def own_project_times(model: str, optimizer: str, variant: str, steps: int, folder: Path,
                      csv: bool = False) -> tuple[float, float]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from gradwatch import GradientTelemetry

    torch.manual_seed(0)
    x = torch.rand(256, 2) * 2 - 1
    batches = torch.utils.data.DataLoader([(x, x.sum(dim=1, keepdim=True))], batch_size=None)
    callbacks = [GradientTelemetry(), StepTimer()] if variant == "on" else [StepTimer()]
    logger = CSVLogger(str(folder), name="csv") if csv else TensorBoardLogger(str(folder), name="own")
    trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    SPANS.clear()
    trainer.fit(OwnModule(HIDDEN[model], optimizer), train_dataloaders=batches)
    return per_step()


def own_csv_times(model: str, optimizer: str, variant: str, steps: int, folder: Path) -> tuple[float, float]:
    return own_project_times(model, optimizer, variant, steps, folder, csv=True)


def bench_models(steps: int, repeats: int, extra: list[str], folder: Path, models: list[str],
                 optimizers: list[str], csv: bool = False) -> None:
    print(f"\nper step, fastest of {repeats} interleaved runs of {steps} steps (first {WARMUP} left out); "
          "ratio: median over the repeats against the neighbouring telemetry-off run of the same harness")
    print(f"{'model':20s} {'optimizer':9s} {'variant':19s} {'CPU ms':>8s} {'ratio':>7s} {'wall ms':>8s} {'ratio':>7s}")
    harnesses = {"pipeline": pipeline_times, "own project": own_project_times}
    if csv:
        harnesses["own CSV"] = own_csv_times
    for model in models:
        for optimizer in optimizers:
            cases = [(h, v) for h in harnesses for v in ("off", "on")] + [("pipeline", v) for v in extra]
            times: dict[tuple, list[tuple[float, float]]] = {c: [] for c in cases}
            for repeat in range(repeats):
                for case in (cases if repeat % 2 == 0 else cases[::-1]):
                    times[case].append(harnesses[case[0]](model, optimizer, case[1], steps, folder))
            for (harness, variant), runs in times.items():
                off = times[(harness, "off")]
                cpu_ratio = float(np.median([on[0] / base[0] for on, base in zip(runs, off, strict=True)]))
                wall_ratio = float(np.median([on[1] / base[1] for on, base in zip(runs, off, strict=True)]))
                cpu, wall = min(t[0] for t in runs), min(t[1] for t in runs)
                print(f"{model:20s} {optimizer:9s} {harness + ' ' + variant:19s} {cpu * 1e3:8.3f} "
                      f"{cpu_ratio:6.3f}x {wall * 1e3:8.3f} {wall_ratio:6.3f}x", flush=True)


def bench_statistics(model: str, calls: int) -> None:
    """The statistics of one step alone (gradients, update ratio, dead units) on the model's
    tensors, outside a training step: the fused CPU kernels against torch operations."""
    torch.manual_seed(0)
    net = OwnModule(HIDDEN[model], "sgd").net
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in net if isinstance(m, nn.ReLU)]
    x = torch.rand(256, 2)
    net(x).sum().backward()
    for hook in hooks:
        hook.remove()
    params = list(net.parameters())
    grads = [p.grad for p in params]
    times = {}
    for kernels in (True, False):
        stats.HOST_KERNELS = kernels
        gradient = stats.GradientStats([p.numel() for p in params])
        update = stats.UpdateRatio([p.numel() for p in params])
        activation = stats.ActivationStats([tuple(o.shape) for o in outputs])

        for repeat in range(calls + 1):
            if repeat == 1:  # the first compiles, or loads the compiled kernels
                started = time.process_time()
            kept = update.before(params)
            gradient.pending(grads)
            activation.pending(outputs)
            update.pending(kept, params)
        times[kernels] = (time.process_time() - started) / calls
    stats.HOST_KERNELS = True
    print(f"statistics alone, {model:18s}: torch ops {times[False] * 1e6:7.1f} us, "
          f"kernels {times[True] * 1e6:7.1f} us, ratio {times[False] / times[True]:5.1f}x", flush=True)


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
    parser.add_argument("--torch-ops", action="store_true", help="also time the pipeline with the statistics as "
                        "torch operations (the GPU path) instead of the CPU kernels")
    parser.add_argument("--csv", action="store_true", help="also time the own project with a CSVLogger")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
    parser.add_argument("--model", choices=["all", "mlp", "deep"], default="all")
    parser.add_argument("--optimizer", choices=["all", *OPTIMIZERS], default="all")
    parser.add_argument("--no-writers", action="store_true", help="skip the event-writer timings")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    with tempfile.TemporaryDirectory() as tmp:
        for n in () if args.no_writers else (2, 51, 700):
            bench_writers(n, 200 if args.quick else 1000, Path(tmp))
        steps = args.steps or (60 if args.quick else 300)
        models = [m for m, key in zip(HIDDEN, ("mlp", "deep"), strict=True) if args.model in ("all", key)]
        for model in models:
            bench_statistics(model, 50 if args.quick else 300)
        optimizers = [o for o in OPTIMIZERS if args.optimizer in ("all", o)]
        extra = ["naive"] * args.naive + ["torch ops"] * args.torch_ops
        bench_models(steps, args.repeats or (1 if args.quick else 5), extra, Path(tmp), models, optimizers, args.csv)


if __name__ == "__main__":
    main()
