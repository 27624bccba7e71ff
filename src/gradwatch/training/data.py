"""Datasets as in-memory tensors, and the batches Lightning trains on.

The sets are small, so batches are slices of tensors already in memory: no DataLoader workers
and no per-sample collation (scripts/bench_step.py measures what that saves).
"""

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gradwatch.config.checks import check
from gradwatch.config.errors import ConfigError

Tensors = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger(__name__)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_size(size: object) -> int:
    return check("dataset.size", size)


def _noisy(y: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    check("dataset.noise", noise)
    return y + noise * torch.randn(y.shape, generator=gen) if noise else y


def line_2x(size: int = 4, low: float = 1.0, high: float = 4.0, noise: float = 0.0, seed: int = 0) -> Tensors:
    """y = 2x on evenly spaced x: `line_2x()` gives x = [[1], [2], [3], [4]], y = [[2], [4], [6], [8]]."""
    x = torch.linspace(low, high, _check_size(size)).unsqueeze(1)
    return x, _noisy(2 * x, noise, _generator(seed))


def sum_x1_x2(size: int = 64, low: float = -1.0, high: float = 1.0, noise: float = 0.0, seed: int = 0) -> Tensors:
    """y = x1 + x2 with x uniform in [low, high]^2."""
    gen = _generator(seed)
    x = low + (high - low) * torch.rand(_check_size(size), 2, generator=gen)
    return x, _noisy(x.sum(dim=1, keepdim=True), noise, gen)


def random_bce(size: int = 64, in_features: int = 2, labels: Sequence[float] | None = None, seed: int = 0) -> Tensors:
    """Standard-normal inputs and 0/1 labels (random, or the given `labels`, one per sample)."""
    gen = _generator(seed)
    x = torch.randn(_check_size(size), in_features, generator=gen)
    if labels is None:
        y = torch.randint(0, 2, (size, 1), generator=gen).float()
    else:
        y = torch.as_tensor(list(labels), dtype=torch.float32).reshape(-1, 1)
        if len(y) != size:
            raise ConfigError("dataset.labels", list(labels), f"one label per sample ({size})")
    return x, y


def _as_rows(key: str, values: object) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ConfigError(key, values, "a list of numbers or of equal-length rows") from err
    if tensor.numel() == 0:
        raise ConfigError(key, values, "at least one point (a dataset cannot be empty)")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() != 2:
        raise ConfigError(key, values, "a list of numbers or of equal-length rows")
    return tensor


def points(x: Sequence, y: Sequence, seed: int = 0) -> Tensors:
    """Literal points: `points([[1, 2], [3, 4]], [3, 7])` -> x (2, 2), y (2, 1)."""
    tx, ty = _as_rows("dataset.x", x), _as_rows("dataset.y", y)
    if len(tx) != len(ty):
        raise ConfigError("dataset.y", list(y), f"as many points as dataset.x ({len(tx)})")
    return tx, ty


DIGITS_CLASSES = 10


def digits(train_fraction: float = 0.8, split: str = "train", seed: int = 0) -> Tensors:
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled, no download), for CrossEntropyLoss.

    x is (n, 64): pixels 0..16 divided by 16, so every input lies in [0, 1], blank pixels stay 0
    and nothing is estimated from the data (standardising would divide the always-blank border
    pixels by a zero std, and would use the held-out images' statistics). y is one-hot (n, 10)
    float, so models get 10 outputs and CrossEntropyLoss takes it as class probabilities.

    The images are shuffled with `seed`; the first `train_fraction` of them (rounded) are the
    `train` split, the rest the `test` split: `digits(split="test", seed=s)` is what a run with
    data seed s never trained on.
    """
    check("dataset.train_fraction", train_fraction)
    if split not in ("train", "test"):
        raise ConfigError("dataset.split", split, "train or test")
    from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(images), generator=_generator(seed))
    n_train = round(train_fraction * len(images))
    if split == "test" and n_train == len(images):
        raise ConfigError("dataset.split", split, f"train (train_fraction={train_fraction} leaves no test images)")
    idx = order[:n_train] if split == "train" else order[n_train:]
    x = torch.as_tensor(images, dtype=torch.float32)[idx] / 16.0
    y = nn.functional.one_hot(torch.as_tensor(labels)[idx], DIGITS_CLASSES).float()
    return x, y


class TensorBatches:
    """Batches of in-memory tensors, in an order drawn from (seed, epoch) when shuffled.

    With `batch_size=None` (full batch) every epoch is the one batch (x, y), as the seeds train.
    It keeps its place (`state_dict`), so a run resumed from a checkpoint taken mid-epoch sees the
    same batches, in the same order, as a run that was never stopped.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int | None, shuffle: bool, seed: int):
        n = len(x)
        check("dataset.batch_size", batch_size)
        self.x, self.y = x, y
        self.batch_size = n if batch_size is None else min(batch_size, n)
        self.shuffle = shuffle and self.batch_size < n
        self.seed = seed
        # Every __iter__ is an epoch (Lightning stops at len() without exhausting the iterator).
        self._next_epoch = 0
        self._epoch = 0
        self._consumed = 0  # batches of the current epoch handed out
        self._skip = 0  # batches the next epoch skips (set by a resume)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[Tensors]:
        self._epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        skip, self._skip = self._skip, 0
        self._consumed = skip
        if self.batch_size == len(self.x):
            if not skip:
                self._consumed = 1
                yield self.x, self.y
            return
        order = None
        if self.shuffle:
            epoch_seed = (self.seed * 1_000_003 + self._epoch) % 2**63  # any seed, any epoch
            order = torch.randperm(len(self.x), generator=_generator(epoch_seed))
        for number, start in enumerate(range(0, len(self.x), self.batch_size)):
            if number < skip:
                continue
            idx = slice(start, start + self.batch_size) if order is None else order[start : start + self.batch_size]
            self._consumed = number + 1
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "samples": min(self._consumed * self.batch_size, len(self.x)),
                "size": len(self.x)}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restarts the interrupted epoch (even a finished one) with one more __iter__,
        # which skips the samples already seen, in batches of the current size.
        self._next_epoch = int(state["epoch"])
        if int(state.get("size", len(self.x))) != len(self.x):
            log.warning("the checkpoint's dataset had %s samples, this one has %d: its epoch starts over",
                        state.get("size"), len(self.x))
            self._skip = 0
            return
        samples = int(state["samples"]) if "samples" in state else int(state.get("consumed", 0)) * self.batch_size
        self._skip = -(-samples // self.batch_size) if samples >= len(self.x) else samples // self.batch_size
