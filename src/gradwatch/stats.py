"""Gradient and activation statistics as plain functions over tensors (no Lightning, no Hydra).

All parameters are reduced together: their gradients are concatenated once and every statistic
is a segment reduction over that one vector, so the cost is a handful of tensor operations
whatever the number of parameters (scripts/bench_telemetry.py measures it).
"""

from collections.abc import Sequence

import torch

from gradwatch.tags import GRAD_STATS


class SegmentReducer:
    """Per-segment reductions over a concatenation of tensors with fixed sizes."""

    def __init__(self, sizes: Sequence[int]):
        self.n = len(sizes)
        counts = torch.as_tensor(list(sizes), dtype=torch.int64)
        self.segment = torch.repeat_interleave(torch.arange(self.n), counts)
        self.counts = counts.to(torch.float64)

    def sum(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n, dtype=flat.dtype).index_add_(0, self.segment, flat)

    def amax(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=flat.dtype)
        return out.scatter_reduce_(0, self.segment, flat, "amax", include_self=False)


def gradient_stats(grads: Sequence[torch.Tensor], reducer: SegmentReducer | None = None) -> torch.Tensor:
    """Statistics of each gradient, as rows (mean, std, zero_fraction, norm, abs_max, nonfinite).

    std is the unbiased std, and 0.0 for a one-element tensor. The last row holds the global norm
    (L2 over all gradients) in its `norm` column, the other columns 0.

    >>> gradient_stats([torch.tensor([3.0, 4.0]), torch.tensor([0.0])]).tolist()[0]
    [3.5, 0.7071067811865476, 0.0, 5.0, 4.0, 0.0]
    """
    reducer = reducer or SegmentReducer([g.numel() for g in grads])
    flat = torch.cat([g.detach().reshape(-1) for g in grads]).to(torch.float64)
    counts = reducer.counts
    mean = reducer.sum(flat) / counts
    deviation = flat - mean[reducer.segment]
    variance = reducer.sum(deviation * deviation) / (counts - 1).clamp(min=1)
    std = torch.where(counts > 1, variance.sqrt(), torch.zeros_like(variance))
    zero_fraction = reducer.sum((flat == 0).to(torch.float64)) / counts
    squares = reducer.sum(flat * flat)
    abs_max = reducer.amax(flat.abs())
    nonfinite = reducer.sum((~torch.isfinite(flat)).to(torch.float64))
    rows = torch.stack([mean, std, zero_fraction, squares.sqrt(), abs_max, nonfinite], dim=1)
    global_row = torch.zeros(1, len(GRAD_STATS), dtype=torch.float64)
    global_row[0, GRAD_STATS.index("norm")] = squares.sum().sqrt()
    return torch.cat([rows, global_row])


def activation_stats(outputs: Sequence[torch.Tensor], reducer: SegmentReducer | None = None):
    """Per layer: (dead_fraction, zero_fraction) rows, and the per-unit `fired` mask.

    A unit is dead on a batch when it outputs 0 for every sample; zero_fraction is the share of
    all the layer's outputs that are 0. Outputs are (batch, ...) tensors; everything past the
    batch dimension counts as units.

    >>> rows, fired = activation_stats([torch.tensor([[0.0, 1.0], [0.0, 0.0]])])
    >>> rows.tolist(), fired.tolist()
    ([[0.5, 0.75]], [False, True])
    """
    flat = [out.detach().reshape(out.shape[0], -1) for out in outputs]
    reducer = reducer or SegmentReducer([f.shape[1] for f in flat])
    nonzero = torch.cat(flat, dim=1) != 0
    fired = nonzero.any(dim=0)
    dead = reducer.sum((~fired).to(torch.float64)) / reducer.counts
    batch = nonzero.shape[0]
    zero = 1.0 - reducer.sum(nonzero.sum(dim=0).to(torch.float64)) / (reducer.counts * batch)
    return torch.stack([dead, zero], dim=1), fired


def epoch_dead_fraction(fired_in_epoch: torch.Tensor, reducer: SegmentReducer) -> torch.Tensor:
    """Per layer, the share of units that never fired during the epoch."""
    return reducer.sum((~fired_in_epoch).to(torch.float64)) / reducer.counts
