"""What gradient telemetry costs per training step, against `telemetry=off`, measured in the same run.

Models (batch 256, full batch, Adam):
- MLP 2-[256]x3-1: 8 parameter tensors, 51 scalars a step;
- deep narrow MLP, 50 Linear layers of width 32: 100 parameter tensors, 700 scalars a step.
Variants, each at every_n_steps 1 and 50:
- gradwatch: the GradientTelemetry callback (fused statistics, one event per step);
- naive: a Python loop over parameters with `.item()` per statistic, logged with `self.log`.
Per-step time is (wall(N2) - wall(N1)) / (N2 - N1) of real pipeline runs, so start-up cancels;
variants are interleaved, and each wall time is the fastest of the repeats (a shared machine only
ever adds time, so the minimum is the steadiest estimate). Also times the TensorBoard event
writers alone (tensorboard's SummaryWriter against gradwatch.storage.events.EventFile).

    python scripts/bench_telemetry.py [--quick]
"""

import argparse
import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from gradwatch.api import train
from gradwatch.storage.events import EventFile
from gradwatch.storage.record import read_run

MODELS = {
    "MLP 2-[256]x3-1": ["model.hidden=[256,256,256]"],
    "deep narrow 50x32": ["model.hidden=[" + ",".join(["32"] * 49) + "]"],
}
COMMON = ["model=mlp", "dataset=sum_x1_x2", "dataset.size=256", "optimizer=adam", "optimizer.lr=1e-4",
          "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=1000000"]


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


VARIANTS = {
    "off": ["telemetry=off"],
    "gradwatch @1": ["telemetry.every_n_steps=1"],
    "gradwatch @50": ["telemetry.every_n_steps=50"],
    "naive @1": [f"telemetry._target_={__name__}.NaiveTelemetry", "telemetry.every_n_steps=1"],
    "naive @50": [f"telemetry._target_={__name__}.NaiveTelemetry", "telemetry.every_n_steps=50"],
}


def wall(overrides: list[str], steps: int, folder: Path) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    with contextlib.redirect_stdout(io.StringIO()):
        train([*COMMON, *overrides, f"trainer.max_steps={steps}"], run_dir)
    record = read_run(run_dir)
    assert record["status"] == "completed", record
    return record["wall_s"]


def bench_models(short: int, long: int, repeats: int, folder: Path) -> None:
    print(f"\nper-step time, steps {short} and {long}, fastest of {repeats} (ratio against telemetry=off)")
    print(f"{'model':20s} {'variant':15s} {'ms/step':>9s} {'ratio':>8s}")
    for name, model in MODELS.items():
        walls: dict[str, dict[int, list[float]]] = {v: {} for v in VARIANTS}
        steps: dict[str, int] = {}
        for _ in range(repeats):
            for variant, overrides in VARIANTS.items():
                # The naive logger at every step is slow enough that fewer steps measure it well.
                steps[variant] = short + (long - short) // 5 if variant == "naive @1" else long
                for n in (short, steps[variant]):
                    walls[variant].setdefault(n, []).append(wall([*model, *overrides], n, folder))
        per_step = {v: (min(w[steps[v]]) - min(w[short])) / (steps[v] - short) for v, w in walls.items()}
        for variant, t in per_step.items():
            print(f"{name:20s} {variant:15s} {t * 1e3:9.3f} {t / per_step['off']:7.3f}x", flush=True)


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
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 51, 700):
            bench_writers(n, 200 if args.quick else 1000, Path(tmp))
        bench_models(10, 60 if args.quick else 310, 1 if args.quick else 5, Path(tmp))


if __name__ == "__main__":
    main()
