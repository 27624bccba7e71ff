"""Per-step cost of the gradwatch pipeline against a plain PyTorch loop, measured in the same run.

For each model, the same config builds the same model and data for both sides:
- pipeline: `gradwatch.api.train` (Hydra config -> Lightning fit -> TensorBoard, parquet, run.json)
  with `telemetry=off`, no progress bar. Per-step time is (wall(N2) - wall(N1)) / (N2 - N1), so
  the fixed start-up of `fit` cancels out.
- plain loop: zero_grad, forward, loss, backward, optimizer step, and `loss.item()` (a loop that
  records its loss), timed over the same number of steps.
Each side is repeated and the fastest repeat taken (a shared machine only ever adds time).
Prints milliseconds per step and the ratio.

    python scripts/bench_step.py            # all models
    python scripts/bench_step.py --quick    # fewer steps and repeats
"""

import argparse
import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

from gradwatch.api import compose_config, train
from gradwatch.config.build import build
from gradwatch.storage.record import read_run

MODELS = {
    "seed_tiny_relu (1-1-1)": ["experiment=seed_tiny_relu"],
    "seed_sum_regression (2-1)": ["experiment=seed_sum_regression"],
    "seed_learn_2x (1-1)": ["experiment=seed_learn_2x"],
    "seed_bce_mlp (2-3-1)": ["experiment=seed_bce_mlp"],
    "MLP 2-[256]x3-1, batch 256": ["model=mlp", "model.hidden=[256,256,256]", "dataset=sum_x1_x2",
                                   "dataset.size=256", "optimizer.lr=0.001"],
}
COMMON = ["telemetry=off", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=1000000"]


def pipeline_seconds(overrides: list[str], steps: int, folder: Path) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    with contextlib.redirect_stdout(io.StringIO()):  # the run's closing line
        train([*overrides, *COMMON, f"trainer.max_steps={steps}"], run_dir)
    return read_run(run_dir)["wall_s"]


def plain_seconds(overrides: list[str], steps: int) -> float:
    parts = build(compose_config([*overrides, *COMMON]))
    model, loss_fn = parts.model, parts.loss_fn
    optimizer = parts.optimizer(model.parameters())
    batches = list(parts.batches)
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    short, long, repeats = (50, 250, 3) if args.quick else (200, 1200, 5)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; steps {short} and {long}, fastest of {repeats}")
    print(f"{'model':32s} {'pipeline ms':>12s} {'plain ms':>10s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in MODELS.items():
            walls_long, walls_short, plain = [], [], []
            for _ in range(repeats):
                walls_long.append(pipeline_seconds(overrides, long, Path(tmp)))
                walls_short.append(pipeline_seconds(overrides, short, Path(tmp)))
                plain.append(plain_seconds(overrides, long - short) / (long - short))
            p = (min(walls_long) - min(walls_short)) / (long - short) * 1e3
            q = min(plain) * 1e3
            print(f"{name:32s} {p:12.3f} {q:10.3f} {p / q:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
