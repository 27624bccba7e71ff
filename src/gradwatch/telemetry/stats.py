"""Gradient and activation statistics as plain functions over tensors (no Lightning, no Hydra).

Tensors with the same number of elements are stacked and reduced together, so a step costs a
handful of tensor operations per distinct size, not per parameter: a 100-layer net with layers of
one width is four groups (scripts/bench_telemetry.py measures it).
"""

from collections import defaultdict
from collections.abc import Sequence

import torch

from gradwatch.telemetry.tags import GRAD_STATS


def _groups(keys: Sequence) -> tuple[list[list[int]], torch.Tensor]:
    """Indices grouped by key, and the permutation that puts grouped rows back in input order."""
    by_key: dict = defaultdict(list)
    for i, key in enumerate(keys):
        by_key[key].append(i)
    groups = list(by_key.values())
    order = torch.empty(len(keys), dtype=torch.int64)
    order[torch.as_tensor([i for g in groups for i in g], dtype=torch.int64)] = torch.arange(len(keys))
    return groups, order


def _stacked(tensors: Sequence[torch.Tensor], idx: list[int], batch: int | None = None) -> torch.Tensor:
    """Tensors of one size stacked as rows (or as (L, batch, units) with `batch`); call under no_grad."""
    shape = (-1,) if batch is None else (batch, -1)
    if len(idx) == 1:
        return tensors[idx[0]].reshape(1, *shape)
    return torch.stack([tensors[i].reshape(shape) for i in idx])


class GradientStats:
    """Statistics of each gradient, as rows (mean, std, zero_fraction, norm, abs_max, nonfinite).

    std is torch's unbiased std, and 0.0 for a one-element tensor. A last row holds the global norm
    (L2 over all gradients) in its `norm` column, the other columns 0.

    >>> GradientStats([2, 1])([torch.tensor([3.0, 4.0]), torch.tensor([0.0])]).tolist()[0]
    [3.5, 0.7071067690849304, 0.0, 5.0, 4.0, 0.0]
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.groups, self.order = _groups(self.sizes)

    @torch.no_grad()
    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = [self._group_rows(_stacked(grads, idx)) for idx in self.groups]
        table = torch.cat(rows).to(torch.float64)[self.order]
        global_row = torch.zeros(1, len(GRAD_STATS), dtype=torch.float64)
        global_row[0, GRAD_STATS.index("norm")] = table[:, GRAD_STATS.index("norm")].square().sum().sqrt()
        return torch.cat([table, global_row])


    @staticmethod
    def _group_rows(g: torch.Tensor) -> torch.Tensor:
        """Rows for a (k, n) stack of k gradients. The operations are the cheapest exact ones
        measured (scripts/bench_telemetry.py): a two-pass variance instead of torch.std_mean along
        a dimension (15x slower), a sum of signs instead of boolean counts (4x slower), and the
        non-finite count only when the norm says there is one."""
        k, n = g.shape
        count_dtype = torch.float64 if n >= 2**24 else g.dtype  # exact integer counts
        mean = g.mean(dim=1)
        if n > 1:
            centered = g - mean[:, None]
            std = (centered.square_().sum(dim=1) / (n - 1)).sqrt_()
        else:
            std = torch.zeros(k, dtype=g.dtype)
        norm = torch.linalg.vector_norm(g, dim=1)
        abs_max = g.abs().amax(dim=1)
        if bool(torch.isfinite(norm).all()):
            nonzero = g.sign().abs_().sum(dim=1, dtype=count_dtype)
            nonfinite = torch.zeros(k, dtype=g.dtype)
        else:  # NaN/Inf somewhere (or a norm that overflowed): count exactly
            nonzero = (g != 0).sum(dim=1).to(count_dtype)
            nonfinite = torch.isfinite(g).logical_not_().sum(dim=1).to(g.dtype)
        zero_fraction = 1 - nonzero / n
        return torch.stack([mean, std, zero_fraction.to(g.dtype), norm, abs_max, nonfinite], dim=1)


def gradient_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`GradientStats` for one list of gradients."""
    return GradientStats([g.numel() for g in grads])(grads)


class ActivationStats:
    """Per layer: (dead_fraction, zero_fraction) rows, and a per-unit `fired` mask.

    For the outputs of ReLU-like modules (>= 0). A unit is dead on a batch when it outputs 0 for
    every sample; zero_fraction is the share of all the layer's outputs that are 0. Outputs are
    (batch, ...) tensors; everything past the batch dimension counts as units. `fired` is only
    for `epoch_dead_fraction` (OR it over the steps of an epoch).

    >>> rows, fired = ActivationStats([(2, 2)])([torch.tensor([[0.0, 1.0], [0.0, 0.0]])])
    >>> rows.tolist(), fired.tolist()
    ([[0.5, 0.75]], [False, True])
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = [tuple(s) for s in shapes]
        self.groups, self.order = _groups(self.shapes)

    @torch.no_grad()
    def __call__(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # ReLU outputs are >= 0, so a unit fired iff its largest output is > 0, and the count of
        # non-zero outputs is the sum of their signs: float reductions, 5-10x cheaper than
        # boolean ones (scripts/bench_telemetry.py).
        rows, fired_parts = [], []
        for idx in self.groups:
            stacked = _stacked(outputs, idx, batch=outputs[idx[0]].shape[0])  # (L, B, U)
            fired = stacked.amax(dim=1) > 0  # (L, U)
            dead = fired.logical_not().sum(dim=1) / fired.shape[1]
            per_layer = stacked.shape[1] * stacked.shape[2]
            count_dtype = torch.float64 if per_layer >= 2**24 else stacked.dtype  # exact integer counts
            # The stack of several layers is our own copy: take the signs in place.
            signs = stacked.sign_() if len(idx) > 1 else stacked.sign()
            zero = 1.0 - signs.sum(dim=(1, 2), dtype=count_dtype) / per_layer
            rows.append(torch.stack([dead.to(torch.float64), zero.to(torch.float64)], dim=1))
            fired_parts.append(fired.reshape(-1))
        return torch.cat(rows)[self.order], torch.cat(fired_parts)

    def epoch_dead_fraction(self, fired_in_epoch: torch.Tensor) -> torch.Tensor:
        """Per layer, the share of units that never fired in the steps OR-ed into `fired_in_epoch`."""
        never, start = [], 0
        flat = fired_in_epoch.reshape(-1)
        for idx in self.groups:
            layers, units = len(idx), flat.new_empty(self.shapes[idx[0]][1:]).numel()
            block = flat[start : start + layers * units].reshape(layers, units)
            never.append(block.logical_not().sum(dim=1).to(torch.float64) / units)
            start += layers * units
        return torch.cat(never)[self.order]


def activation_stats(outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`ActivationStats` for one list of layer outputs."""
    return ActivationStats([tuple(o.shape) for o in outputs])(outputs)
