"""What gradient monitoring costs in a GPU training step, side by side, in one run.

Models, each in a plain Lightning Trainer with AdamW and a TensorBoardLogger, one batch held on
the device (so the step is the model, not the data loader):
- gpt: a GPT of ~98M parameters (12 blocks of width 768, vocabulary 8192, 256 tokens, batch 32),
  149 tensors, bf16-mixed;
- mlp_wide: MLP 1024-[4096]x8-10 (~122M parameters), fp32 with TF32 matmuls, batch 4096;
- resnet18: ResNet-18 (written here in plain torch), 100 classes, batch 256 of 3x64x64, bf16-mixed;
- mlp_small: MLP 2-[256]x3-1, and deep_small: 50 layers of width 32, both launch-bound, batch 256;
- gpt_big: a GPT of ~2.5B parameters (32 blocks of width 2560), batch 8, bf16-mixed: does it
  train with telemetry every step, at what peak memory.
Monitors (variants):
- off: the same Trainer without a monitor;
- gradwatch: GradientTelemetry every step; gradwatch_10: every 10 steps;
- lightning: Lightning's documented way, `log_dict(grad_norm(module, norm_type=2))` every step;
- naive: `.item()` per statistic (mean, std, zero fraction) per parameter, to TensorBoard;
- floor: one `torch._foreach_norm` per step, copied to pinned memory without blocking and read
  a step later: the least a per-parameter monitor can cost.
Method: the variants of a model run interleaved, `--repeats` times (the GPU's clocks and the
host drift over minutes; neighbours share the drift). A run's figure is the wall time of its
last `--steps` steps after `--warmup` steps (the first builds kernels and buffers), with the
GPU synchronised at both ends; the table gives the median over the repeats in ms per step and
its ratio to `off`'s median, the peak GPU memory of the fit and its excess over `off`, and the
memory still allocated once the Trainer, the model and the callbacks are dropped (before and
after `gc.collect()`: what a next fit in the same process starts with). `--syncs` counts the
host synchronisations per step with torch's sync debug mode, `off` against `gradwatch` (on
`mlp_small`; `--no-syncs` skips it).

Without CUDA it says so and makes a small CPU dry run (tiny models, 2 repeats, a few steps), so
the script is known to work before device time is spent on it; then CPU proxies of the GPU path:
what it allocates and launches for a GPT's 149 tensors, and the host time GradientTelemetry's
hooks take a step in a fit of the launch-bound MLPs with the launches left out
(`callback_host_proxy`).

`--kernels` also times the kernels alone on the GPT's gradients for several block, chunk and
warps choices, against one `_foreach_norm` (the bandwidth each reaches): the layout to keep.

    python scripts/bench_gpu.py [--models gpt,mlp_wide,resnet18,gpt_big] [--repeats 3] [--no-syncs]
        [--kernels]
        [--out results.json] [--budget-s 540]
"""

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the dry run's proxy runs the GPU kernels in triton's interpreter (read when triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch import GradientTelemetry  # noqa: E402
from gradwatch.telemetry import stats  # noqa: E402
from gradwatch.telemetry.dispatch_count import Launches, TorchOps  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
MIB = 2**20


# -- models ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.attn_out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, blocks: int, heads: int, tokens: int):
        super().__init__()
        self.token, self.position = nn.Embedding(vocab, width), nn.Embedding(tokens, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(blocks)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.token(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.norm(self.blocks(x)))


class Residual(nn.Module):
    """ResNet's basic block: two 3x3 convolutions, a projection where the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(classes: int, width: int = 64) -> nn.Module:
    stages, inputs = [], width
    for stage, outputs in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if stage == 0 else 2
        stages += [Residual(inputs, outputs, stride), Residual(outputs, outputs, 1)]
        inputs = outputs
    return nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(inputs, classes))


def mlp(inputs: int, width: int, layers: int, outputs: int) -> nn.Sequential:
    parts, size = [], inputs
    for _ in range(layers):
        parts += [nn.Linear(size, width), nn.ReLU()]
        size = width
    return nn.Sequential(*parts, nn.Linear(size, outputs))


def token_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def build(kind: str, small: bool):
    """(network, input, target, loss, precision), made from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    if kind in ("gpt", "gpt_big"):
        vocab, width, blocks, heads, tokens, batch = (
            (64, 32, 2, 2, 8, 2) if small else (8192, 768, 12, 12, 256, 32) if kind == "gpt"
            else (8192, 2560, 32, 20, 256, 8))
        with torch.device(DEVICE):  # 2.5B weights made on the GPU, not in host memory first
            net = GPT(vocab, width, blocks, heads, tokens)
        ids = torch.randint(0, vocab, (batch, tokens + 1), generator=g)
        return net, ids[:, :-1], ids[:, 1:], token_loss, "bf16-mixed"
    if kind == "mlp_wide":
        inputs, width, batch = (16, 64, 32) if small else (1024, 4096, 4096)
        return (mlp(inputs, width, 8, 10), torch.randn(batch, inputs, generator=g),
                torch.randint(0, 10, (batch,), generator=g), F.cross_entropy, "32-true")
    if kind == "resnet18":
        width, batch, side = (8, 4, 16) if small else (64, 256, 64)
        return (resnet18(100, width), torch.randn(batch, 3, side, side, generator=g),
                torch.randint(0, 100, (batch,), generator=g), F.cross_entropy, "bf16-mixed")
    if kind in ("mlp_small", "deep_small"):
        net = mlp(2, 256, 3, 1) if kind == "mlp_small" else mlp(2, 32, 50, 1)
        return net, torch.randn(256, 2, generator=g), torch.randn(256, 1, generator=g), F.mse_loss, "32-true"
    raise ValueError(f"--models: unknown model {kind!r}; known: {', '.join(MODELS)}")


MODELS = ("gpt", "mlp_wide", "resnet18", "mlp_small", "deep_small", "gpt_big")


class Task(pl.LightningModule):
    def __init__(self, net, x, y, loss):
        super().__init__()
        self.net, self.loss = net, loss
        self.register_buffer("x", x, persistent=False)
        self.register_buffer("y", y, persistent=False)

    def training_step(self, batch, index):
        return self.loss(self.net(self.x), self.y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


# -- monitors -------------------------------------------------------------------------------------
class LightningGradNorm(pl.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        module.log_dict(grad_norm(module, norm_type=2))


class NaiveItems(pl.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        writer, step = trainer.logger.experiment, trainer.global_step
        for name, param in module.named_parameters():
            if param.grad is not None:
                grad = param.grad.float()
                writer.add_scalar(f"grad/{name}/mean", grad.mean().item(), step)
                writer.add_scalar(f"grad/{name}/std", grad.std().item(), step)
                writer.add_scalar(f"grad/{name}/zero_fraction", (grad == 0).float().mean().item(), step)


class ForeachNormLater(pl.Callback):
    """Every parameter's gradient norm in one `_foreach_norm`, copied to pinned host memory
    without blocking and read when the next step reaches the same point."""

    def __init__(self):
        self.pending = None
        self.read = 0.0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.pending is not None:
            host, done = self.pending
            done.synchronize()  # long done: a step has run since
            self.read += float(host.sum())
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads))
        if CUDA:
            host = torch.empty(norms.shape, dtype=norms.dtype, pin_memory=True)
            host.copy_(norms, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = norms, contextlib.nullcontext()
            done.synchronize = lambda: None
        self.pending = host, done


VARIANTS = {
    "off": list,
    "gradwatch": lambda: [GradientTelemetry(every_n_steps=1)],
    "gradwatch_10": lambda: [GradientTelemetry(every_n_steps=10)],
    "lightning": lambda: [LightningGradNorm()],
    "naive": lambda: [NaiveItems()],
    "floor": lambda: [ForeachNormLater()],
}


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


class Timer(pl.Callback):
    """Wall time of the steps after `warmup`, the GPU synchronised at both ends."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.start = self.ms = None

    def on_train_batch_end(self, trainer, module, outputs, batch, index):
        if index == self.warmup - 1:
            synchronize()
            self.start = time.perf_counter()
        elif index == self.warmup + self.steps - 1:
            synchronize()
            self.ms = (time.perf_counter() - self.start) / self.steps * 1e3


class SyncCounter(pl.Callback):
    """Host synchronisations in the steps after `warmup`, counted by torch's sync debug mode."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.caught: list | None = None
        self._context = None

    def on_train_batch_start(self, trainer, module, batch, index):
        if index == self.warmup and CUDA:
            self._context = warnings.catch_warnings(record=True)
            self.caught = self._context.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, module):
        if self._context is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._context.__exit__(None, None, None)
            self._context = None

    def count(self) -> int | None:
        if self.caught is None:
            return None
        return sum("synchroniz" in str(w.message).lower() for w in self.caught)


def fit(kind: str, variant: str, warmup: int, steps: int, small: bool, extra: list | None = None) -> dict:
    """One Trainer fit; its ms per step, peak memory and what it left allocated."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    result: dict = {}
    timer = Timer(warmup, steps)
    try:
        net, x, y, loss, precision = build(kind, small)
        result["params"] = sum(p.numel() for p in net.parameters())
        result["tensors"] = len(list(net.parameters()))
        with tempfile.TemporaryDirectory() as logs:
            trainer = pl.Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, precision=precision,
                                 max_steps=warmup + steps, logger=TensorBoardLogger(logs, name="bench"),
                                 log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                                 enable_checkpointing=False, callbacks=VARIANTS[variant]() + [timer] + (extra or []))
            data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(warmup + steps)),
                                               batch_size=1)
            trainer.fit(Task(net, x, y, loss), data)
            result["ms"] = timer.ms
            if CUDA:
                result["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
            del trainer, net, x, y, data
        if CUDA:
            result["left_mib"] = torch.cuda.memory_allocated() / MIB
            gc.collect()
            result["left_after_gc_mib"] = torch.cuda.memory_allocated() / MIB
    except Exception as error:  # an out-of-memory fit is a result (the 2.5B GPT with a monitor)
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return result


def device_path_proxy(width: int = 64) -> dict:
    """On the CPU, what the GPU path allocates and does on the host for a GPT's 149 tensors (of
    `width`), against the torch operations it replaces: the bytes of new storage at the first
    logged step (its buffers) and at a later one, per parameter; and the host's time a logged
    step with the kernels' launches left out (Triton's own launch cost comes on top on a GPU)."""
    net = GPT(64, width, 12, 2, 16)
    weights = [p.detach().clone() for p in net.parameters()]
    grads = [torch.randn_like(w) for w in weights]
    sizes, params = [w.numel() for w in weights], sum(w.numel() for w in weights)
    report = {"tensors": len(weights), "params": params}
    saved = stats.HOST_KERNELS, stats.DEVICE_KERNELS_ON_CPU
    try:
        for path, device_kernels in (("torch operations", False), ("device kernels", True)):
            stats.HOST_KERNELS, stats.DEVICE_KERNELS_ON_CPU = False, device_kernels
            grad_stats, ratio = stats.GradientStats(sizes), stats.UpdateRatio(sizes)
            made = []
            for step in range(3):
                with TorchOps() as ops:
                    kept = ratio.before(weights, reuse=step > 0)
                    grad_stats.pending(grads)
                    ratio.pending(kept, weights, carry=True)
                made.append(ops.bytes / params)
            report[path] = {"first_step_bytes_per_param": made[0], "later_step_bytes_per_param": made[2]}
            if device_kernels:  # the host's share: launches replaced by nothing
                plans = (grad_stats._device[1], ratio._device[1])
                for plan in plans:
                    plan._chunks = plan._merge = Launches()
                started = time.perf_counter()
                for _ in range(200):
                    kept = ratio.before(weights, reuse=True)
                    grad_stats.pending(grads)
                    ratio.pending(kept, weights, carry=True)
                report[path]["host_us_per_step_without_launches"] = (time.perf_counter() - started) / 200 * 1e6
                report[path]["launches_per_step"] = 2 * (len({w.dtype for w in weights}) + 1)
    finally:
        stats.HOST_KERNELS, stats.DEVICE_KERNELS_ON_CPU = saved
    return report


def callback_host_proxy(kinds: tuple[str, ...] = ("mlp_small", "deep_small"), steps: int = 200) -> dict:
    """On the CPU, the host's share of GradientTelemetry every step on the GPU path, in a Lightning
    fit of the launch-bound MLPs: the microseconds a step spent in the callback's and its
    recorder's hooks (Triton's launches replaced by nothing, so their own cost comes on top on a
    GPU; the models' torch work runs on the CPU, outside the hooks), and the launches a step.
    On a GPU these models' steps are launch-bound (2.6 and 13 ms on an H200): the host time a
    monitor adds there is what it costs."""
    import functools

    from gradwatch.telemetry import gpu
    from gradwatch.telemetry.recorder import StepRecorder

    spent, depth = [0.0], [0]

    def timed(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # a hook calling another (the callback its recorder's) counts once
                    spent[0] += time.perf_counter() - started
        return run

    saved_flags = stats.HOST_KERNELS, stats.DEVICE_KERNELS_ON_CPU
    saved_kernel = gpu._kernel
    saved_methods = [(cls, name, vars(cls)[name]) for cls in (GradientTelemetry, StepRecorder) for name in vars(cls)
                     if name.startswith("on_") or name == "_after_optimizer_step"]
    report = {}
    try:
        stats.HOST_KERNELS, stats.DEVICE_KERNELS_ON_CPU = False, True
        gpu._kernel = lambda function: Launches()
        for cls, name, method in saved_methods:
            setattr(cls, name, timed(method))
        for kind in kinds:
            torch.manual_seed(0)
            net, x, y, loss, _ = build(kind, False)
            spent[0], Launches.count = 0.0, 0
            with tempfile.TemporaryDirectory() as logs:
                trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=1,
                                     logger=TensorBoardLogger(logs, name="bench"), enable_progress_bar=False,
                                     enable_model_summary=False, enable_checkpointing=False,
                                     callbacks=[GradientTelemetry(every_n_steps=1)])
                data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(steps)), batch_size=1)
                trainer.fit(Task(net, x, y, loss), data)
            report[kind] = {"host_us_per_step": spent[0] / steps * 1e6,
                            "launches_per_step": Launches.count / steps}
    finally:
        stats.HOST_KERNELS, stats.DEVICE_KERNELS_ON_CPU = saved_flags
        gpu._kernel = saved_kernel
        for cls, name, method in saved_methods:
            setattr(cls, name, method)
    return report


def kernel_layouts(small: bool) -> list[dict]:
    """The kernels alone on the 98M GPT's gradients (its 149 tensors, float32, as under
    bf16-mixed), for each block, chunk and warps tried, against one `_foreach_norm` (which reads
    the same bytes): microseconds a call, timed with CUDA events over 50 calls after 5, and the
    bandwidth that makes. The update ratio's kernel with `carry` reads two copies and writes one."""
    from gradwatch.telemetry import gpu

    net = GPT(64, 32, 2, 2, 8) if small else GPT(8192, 768, 12, 12, 256)
    grads = [torch.randn_like(p, device=DEVICE) for p in net.parameters()]
    weights = [torch.randn_like(g) for g in grads]
    sizes, dtypes = [g.numel() for g in grads], [g.dtype for g in grads]
    nbytes = sum(g.numel() * g.element_size() for g in grads)

    def timed(call, reads: int) -> dict:
        for _ in range(5):
            call()
        if not CUDA:
            return {}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            call()
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) / 50 * 1e3
        return {"us": us, "GB/s": reads * nbytes / us / 1e3}

    rows = [{"what": "_foreach_norm", **timed(lambda: torch._foreach_norm(grads), 1)}]
    layouts = [(1024, 32768, 8), (1024, 32768, 4), (512, 16384, 4), (1024, 65536, 8), (2048, 65536, 8)]
    for block, chunk, warps in layouts[:1] if small else layouts:
        sums = gpu.GradientSums(sizes, dtypes, grads[0].device, block, chunk, warps)
        rows.append({"what": f"statistics block={block} chunk={chunk} warps={warps}",
                     **timed(lambda sums=sums: sums(grads), 1)})
        norms = gpu.UpdateNorms(sizes, dtypes, grads[0].device, block, chunk, 4 if warps == 8 else warps)
        norms.keep(weights)
        rows.append({"what": f"update ratio (carry) block={block} chunk={chunk}",
                     **timed(lambda norms=norms: norms(weights, carry=True), 3)})
    return rows


def summarise(runs: dict) -> dict:
    """Per model and variant: median ms, ratio to off's median, peak and excess peak, left after fit."""
    table = {}
    for kind, variants in runs.items():
        offs = [r["ms"] for r in variants.get("off", []) if r.get("ms")]
        off_ms = statistics.median(offs) if offs else math.nan
        off_peak = max((r.get("peak_mib", 0) for r in variants.get("off", [])), default=0)
        table[kind] = {}
        for variant, results in variants.items():
            ms = [r["ms"] for r in results if r.get("ms")]
            peaks = [r["peak_mib"] for r in results if r.get("peak_mib")]
            median = statistics.median(ms) if ms else math.nan
            table[kind][variant] = {
                "ms": median, "ratio": median / off_ms, "ratios": [m / off_ms for m in ms],
                "peak_mib": max(peaks, default=math.nan), "extra_peak_mib": max(peaks, default=math.nan) - off_peak,
                "left_mib": max((r.get("left_mib", 0) for r in results), default=0),
                "left_after_gc_mib": max((r.get("left_after_gc_mib", 0) for r in results), default=0),
                "params": next((r["params"] for r in results if "params" in r), None),
                "error": next((r["error"] for r in results if "error" in r), None)}
    return table


def print_table(table: dict) -> None:
    print(f"\n{'model':<11} {'variant':<13} {'ms/step':>9} {'ratio':>7} {'peak MiB':>9} {'+peak':>8} "
          f"{'left':>7} {'left gc':>7}  ratios")
    for kind, variants in table.items():
        for variant, row in variants.items():
            if row["error"]:
                print(f"{kind:<11} {variant:<13} {row['error']}")
                continue
            print(f"{kind:<11} {variant:<13} {row['ms']:9.2f} {row['ratio']:6.3f}x {row['peak_mib']:9.0f} "
                  f"{row['extra_peak_mib']:8.0f} {row['left_mib']:7.0f} {row['left_after_gc_mib']:7.0f}  "
                  + " ".join(f"{r:.3f}" for r in row["ratios"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt,mlp_wide,resnet18,mlp_small,deep_small,gpt_big")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-syncs", action="store_true", help="skip counting host synchronisations per step")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip what would start after this many seconds")
    parser.add_argument("--kernels", action="store_true", help="also time the kernels alone for several layouts")
    parser.add_argument("--proxy-only", action="store_true", help="without CUDA: only the GPU path's CPU proxy")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_gpu.json"))
    args = parser.parse_args()
    models = args.models.split(",")
    variants = args.variants.split(",")
    for name, known, given in (("--models", MODELS, models), ("--variants", VARIANTS, variants)):
        unknown = [v for v in given if v not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; allowed: {', '.join(known)}")
    small = not CUDA
    warmup, steps, repeats = (args.warmup, args.steps, args.repeats) if CUDA else (3, 4, 2)
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print("no CUDA device: a small CPU dry run (tiny models, 2 repeats, 4 steps); these are not GPU figures")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    runs: dict = {}
    report: dict = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu (dry run)", "runs": runs}
    for kind in [] if args.proxy_only and not CUDA else models:
        big = kind == "gpt_big"
        for repeat in range(1 if big else repeats):
            for variant in (("off", "gradwatch") if big else variants):
                if time.monotonic() - started > args.budget_s:
                    runs.setdefault(kind, {}).setdefault(variant, []).append({"error": "skipped: --budget-s spent"})
                    continue
                result = fit(kind, variant, 2 if big else warmup, 4 if big else steps, small)
                runs.setdefault(kind, {}).setdefault(variant, []).append(result)
                print(kind, variant, repeat, {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()},
                      flush=True)
    if not args.no_syncs and CUDA:
        counts = {}
        for variant in ("off", "gradwatch"):
            counter = SyncCounter(warmup)
            result = fit("mlp_small", variant, warmup, steps, small, extra=[counter])
            found = counter.count()
            counts[variant] = None if found is None else found / steps
            print("syncs per step", variant, counts[variant], result.get("error") or "", flush=True)
        report["syncs_per_step"] = counts
    if args.kernels:
        report["kernels"] = kernel_layouts(small)
        for row in report["kernels"]:
            print("kernels alone:", {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    if not CUDA:
        from gradwatch.telemetry import gpu

        if gpu.interpreting():
            report["device_path_proxy"] = proxy = device_path_proxy()
            print("\nthe GPU path on the CPU (triton's interpreter), a GPT's tensors:", json.dumps(proxy, indent=1))
            report["callback_host_proxy"] = hosted = callback_host_proxy()
            print("\nthe callback's host time on the GPU path (launches left out), launch-bound MLPs:",
                  json.dumps(hosted, indent=1))
    report["summary"] = summarise(runs)
    print_table(report["summary"])
    with open(args.out, "w") as file:
        json.dump(report, file, indent=1, default=str)
    print(f"\nwritten: {args.out} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
