"""Gradient and activation statistics as plain functions over tensors (no Lightning, no Hydra).

Tensors with the same number of elements are stacked and reduced together, and all small ones
share one zero-padded stack, so a step costs a handful of tensor operations per group, not per
parameter: a 100-layer net with layers of one width is two groups (scripts/bench_telemetry.py
measures it).

Exact at any finite magnitude and precision: each gradient is read in float32 (bf16 and fp16
widen exactly) and divided by the power of two of its largest magnitude's binade, so its squares
neither underflow (a vanishing 1e-30 gradient) nor overflow (an exploding 1e31 one); a power of
two scales exactly, so the sums are the same float32 sums as torch's own, only kept in range.
Counts (zeros, non-finite values, dead units) are integer reductions. Every tensor is made on the
inputs' device and nothing here reads a value back to the host: the caller transfers the result
once (`.cpu()`), which is the step's only synchronisation.
"""

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch._utils import _flatten_dense_tensors

from gradwatch.telemetry.tags import GRAD_STATS

_WIDE = (torch.float32, torch.float64)
# Tensors this small share one zero-padded group whatever their sizes: their reductions cost the
# per-operation overhead, not the elements, so fewer groups is what makes them cheap.
SMALL = 4096
# Per dtype: the exponent-bits mask of its integer view, and the range a power-of-two scale keeps
# to (normal numbers, so the scale itself is exact).
_EXPONENT = {torch.float32: (torch.int32, 0x7F800000, 2.0**-126, 2.0**127),
             torch.float64: (torch.int64, 0x7FF0000000000000, 2.0**-1022, 2.0**1023)}


def _groups(keys: Sequence) -> tuple[list[list[int]], list[int]]:
    """Indices grouped by key, and the position of each input's row in the grouped order."""
    by_key: dict = defaultdict(list)
    for i, key in enumerate(keys):
        by_key[key].append(i)
    groups = list(by_key.values())
    order = [0] * len(keys)
    for position, i in enumerate(i for g in groups for i in g):
        order[i] = position
    return groups, order


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16 (exact: every half value is a float32 value); float32/64 unchanged."""
    return t if t.dtype in _WIDE else t.float()


def _count_dtype(n: int) -> torch.dtype:
    # Sums of 0/1 values are exact integer arithmetic while every partial sum is representable:
    # below 2**24 in float32, below 2**53 in float64. Measured 5-8x cheaper than count_nonzero or
    # a boolean sum (scripts/bench_telemetry.py); the caller turns the counts into int64.
    return torch.float32 if n < 2**24 else torch.float64


class SizeGroups:
    """Tensors of many sizes as a few (k, n) float32 (or float64) stacks: one per size, plus one
    zero-padded stack for every tensor of at most `SMALL` elements. Reductions over a stack cost a
    few operations per group, not per tensor; `order` puts the rows back in input order."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.groups, self._order = _groups([0 if n <= SMALL else n for n in self.sizes])
        self.row_sizes = [self.sizes[i] for g in self.groups for i in g]
        self._padded = [len({self.sizes[i] for i in g}) > 1 for g in self.groups]
        self._on: dict = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """On `device`, made once: the row order, each row's element count (float64), and per
        group the mask of real (not padding) elements and the indices that lay the concatenated
        tensors out as padded rows (None for a group of one size)."""
        if device not in self._on:
            order = torch.tensor(self._order, dtype=torch.int64, device=device)
            counts = torch.tensor(self.row_sizes, dtype=torch.float64, device=device)
            masks, gathers = [], []
            for idx, padded in zip(self.groups, self._padded, strict=True):
                if not padded:
                    masks.append(None)
                    gathers.append(None)
                    continue
                sizes = torch.tensor([self.sizes[i] for i in idx], device=device)
                starts = sizes.cumsum(0) - sizes
                columns = torch.arange(max(self.sizes[i] for i in idx), device=device)
                real = columns < sizes[:, None]
                masks.append(real.float())
                # Indices into the concatenated tensors, with one 0 appended for the padding.
                gathers.append(torch.where(real, starts[:, None] + columns, sizes.sum()))
            self._on[device] = order, counts, masks, gathers
        return self._on[device]

    def stacks(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One (k, n) float32-or-wider stack per group (a copy); call under no_grad."""
        gathers = self.constants(tensors[0].device)[3]
        out = []
        for idx, gather in zip(self.groups, gathers, strict=True):
            if len(idx) == 1:
                out.append(_wide(tensors[idx[0]].reshape(1, -1)))
                continue
            # One C++ call flattens and concatenates (a Python loop of reshapes costs more than the math).
            group = [tensors[i] for i in idx]
            if gather is None:
                out.append(_wide(_flatten_dense_tensors(group).view(len(idx), -1)))
            else:  # the padding points at one appended 0
                flat = _flatten_dense_tensors([*group, group[0].new_zeros(1)])
                out.append(_wide(flat.index_select(0, gather.reshape(-1)).view(len(idx), -1)))
        return out


def _scale_of(abs_max: torch.Tensor) -> torch.Tensor:
    """The power of two of each value's binade (its exponent bits), kept to normal numbers: a
    row divided by it has its largest magnitude in [1, 2), exactly. 0 gives the smallest normal
    number (the row stays 0), inf and NaN the largest (they stay inf and NaN)."""
    int_dtype, mask, low, high = _EXPONENT[abs_max.dtype]
    return (abs_max.view(int_dtype) & mask).view(abs_max.dtype).clamp_(low, high)


class GradientStats:
    """Statistics of each gradient, as rows (mean, std, zero_fraction, norm, abs_max, nonfinite).

    std is torch's unbiased std, and 0.0 for a one-element tensor. A last row holds the global norm
    (L2 over all gradients) in its `norm` column, the other columns 0. The table is float64, on
    the gradients' device.

    >>> GradientStats([2, 1])([torch.tensor([3.0, 4.0]), torch.tensor([0.0])]).tolist()[0]
    [3.5, 0.7071067811865476, 0.0, 5.0, 4.0, 0.0]
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.stacker = SizeGroups(self.sizes)

    @torch.no_grad()
    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        order, n, masks, _ = self.stacker.constants(grads[0].device)
        parts = [self._group_sums(g, mask) for g, mask in zip(self.stacker.stacks(grads), masks, strict=True)]
        sums = torch.cat([p[0] for p in parts]).double()  # (k, 5): the scaled rows' sums, and the scale
        counts = torch.cat([p[1] for p in parts]).double()  # (k, 2): non-zero, non-finite (exact integers)
        scale = sums[:, 4]
        mean = sums[:, 0] / n * scale
        std = (sums[:, 1] / (n - 1).clamp_(min=1)).sqrt_() * scale  # one element: centred sum 0, std 0
        abs_max = sums[:, 3]
        # The float32 sum of squares holds abs_max**2 as one of its terms: its root is >= abs_max
        # but for the last bit; keep the inequality exact.
        norm = torch.maximum(sums[:, 2] * scale, abs_max)
        zero_fraction = (n - counts[:, 0]) / n
        table = torch.stack([mean, std, zero_fraction, norm, abs_max, counts[:, 1]], dim=1).index_select(0, order)
        global_norm = torch.linalg.vector_norm(table[:, GRAD_STATS.index("norm")])  # float64: no overflow
        global_row = torch.zeros(1, len(GRAD_STATS), dtype=torch.float64, device=table.device)
        global_row[0, GRAD_STATS.index("norm")] = global_norm
        return torch.cat([table, global_row])

    @staticmethod
    def _group_sums(g: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """For a (k, n) stack (zero-padded where `mask` is given): (k, 5) sums of the rows scaled
        into [1, 2) (sum, centred sum of squares, norm, and the unscaled abs_max and scale), and
        (k, 2) counts (non-zero, non-finite). The cheapest exact operations measured
        (scripts/bench_telemetry.py): a two-pass variance instead of torch.std_mean along a
        dimension, float sums of 0/1 values instead of boolean counts."""
        k, n = g.shape
        count_dtype = _count_dtype(n)
        magnitude = g.abs()
        abs_max = magnitude.amax(dim=1)
        scale = _scale_of(abs_max)
        x = g / scale[:, None]
        total = x.sum(dim=1)
        real = n if mask is None else mask.sum(dim=1)
        centred = x - (total / real)[:, None]
        if mask is not None:
            centred.mul_(mask)  # padding is not a sample
        squares = centred.square_().sum(dim=1)
        norm = torch.linalg.vector_norm(x, dim=1)
        # NaN counts as non-zero (NaN != 0), but torch's sign(NaN) is 0: make it 1 first.
        nonzero = magnitude.nan_to_num_(nan=1.0).sign_().sum(dim=1, dtype=count_dtype)
        # x - x is 0 for a finite x and NaN for inf and NaN.
        nonfinite = torch.sub(x, x, out=centred).nan_to_num_(nan=1.0).sum(dim=1, dtype=count_dtype)
        return (torch.stack([total, squares, norm, abs_max, scale], dim=1),
                torch.stack([nonzero, nonfinite], dim=1).long())


def gradient_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`GradientStats` for one list of gradients."""
    return GradientStats([g.numel() for g in grads])(grads)


class UpdateRatio:
    """||theta_after - theta_before|| / ||theta_before|| per parameter, for one optimizer step.

    `before(params)` keeps a copy of the weights (stacked as `SizeGroups`); `__call__(kept,
    params)` gives the ratios, float64 on the weights' device: inf for weights that were all 0
    and moved, 0 for weights that did not move.

    >>> w = torch.tensor([3.0, 4.0]); ratio = UpdateRatio([2]); kept = ratio.before([w])
    >>> ratio(kept, [w + torch.tensor([0.0, 0.5])]).tolist()
    [0.1]
    """

    def __init__(self, sizes: Sequence[int]):
        self.stacker = SizeGroups(sizes)

    @torch.no_grad()
    def before(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.stacker.stacks(params)

    @torch.no_grad()
    def __call__(self, kept: list[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
        order = self.stacker.constants(kept[0].device)[0]
        after = self.stacker.stacks(params)
        # Padding is 0 before and after: it adds nothing to either norm.
        norms = [torch.linalg.vector_norm(torch.stack([b, a.sub_(b)]), dim=2) for b, a in zip(kept, after, strict=True)]
        both = torch.cat(norms, dim=1).double()  # (2, k): ||before||, ||after - before||
        ratio = both[1] / both[0]
        return torch.where(both[1] == 0, 0.0, ratio)[order]


def unit_view(calls: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A layer's outputs in one step as (samples, units, positions).

    Dimension 1 holds the units: the features of a (batch, features) output, the channels of a
    convolution's (batch, channels, height, width) one, whose positions are pooled. Several calls
    of one module in a step are concatenated along the batch dimension (or, when their positions
    differ, along the positions), so a unit is dead only if it fired in none of the calls.

    >>> unit_view([torch.zeros(4, 3, 5, 5), torch.zeros(2, 3, 5, 5)]).shape
    torch.Size([6, 3, 25])
    """
    if isinstance(calls, torch.Tensor):
        calls = [calls]
    views = [o.reshape(1, -1, 1) if o.dim() == 1 else o.reshape(o.shape[0], o.shape[1], -1) for o in calls]
    if len(views) == 1:
        return views[0]
    if len({v.shape[1:] for v in views}) == 1:
        return torch.cat(views)
    return torch.cat([v.transpose(0, 1).reshape(1, v.shape[1], -1) for v in views], dim=2)


class ActivationStats:
    """Per layer: (dead_fraction, zero_fraction) rows, and a per-unit `fired` mask.

    For the outputs of ReLU-like modules (>= 0). A unit (a feature, or a convolution's channel:
    `unit_view`) is dead on a batch when it outputs 0 for every sample and position;
    zero_fraction is the share of all the layer's outputs that are 0. Both are exact integer
    counts whatever the outputs' dtype (bf16 included), returned as float64 on the outputs'
    device. `fired` (the layers' units, in layer order) is for `epoch_dead_fraction`: OR it over
    the steps of an epoch.

    >>> rows, fired = ActivationStats([(2, 2)])([torch.tensor([[0.0, 1.0], [0.0, 0.0]])])
    >>> rows.tolist(), fired.tolist()
    ([[0.5, 0.75]], [False, True])
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        """`shapes`: each layer's output shape, or the shape of its `unit_view`."""
        self.shapes = [self._view_shape(tuple(s)) for s in shapes]
        self.units = [u for _, u, _ in self.shapes]
        self.groups, self._order = _groups(self.shapes)
        self._on: dict = {}

    @staticmethod
    def _view_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
        if len(shape) == 1:
            return 1, shape[0], 1
        positions = 1
        for size in shape[2:]:
            positions *= size
        return shape[0], shape[1], positions

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Made once per device: the row order, and where each layer's units sit in the grouped
        `fired` vector (to put them in layer order)."""
        if device not in self._on:
            starts, offset = {}, 0
            for idx in self.groups:
                for i in idx:
                    starts[i] = offset
                    offset += self.units[i]
            units = [starts[i] + u for i in range(len(self.shapes)) for u in range(self.units[i])]
            self._on[device] = (torch.tensor(self._order, dtype=torch.int64, device=device),
                                torch.tensor(units, dtype=torch.int64, device=device))
        return self._on[device]

    @torch.no_grad()
    def __call__(self, outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]],
                 combine: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`outputs`: per layer, its output, or the outputs of its calls in this step. `combine`
        (distributed runs) maps this process's counts, `(fired (L, U), nonzero (L,))`, to the
        global batch's, `(fired, nonzero, copies)`, where `copies` is how many shards of this size
        the global batch holds."""
        views = [unit_view(o) for o in outputs]
        order, unit_order = self._constants(views[0].device)
        rows, fired_parts = [], []
        for idx in self.groups:
            samples, units, positions = self.shapes[idx[0]]
            stacked = views[idx[0]][None] if len(idx) == 1 else torch.stack([views[i] for i in idx])  # (L, B, U, P)
            # ReLU outputs are >= 0: a unit fired iff its largest output is > 0 (exact in any
            # dtype), and an output is non-zero iff its sign is 1: float sums of 0/1 values,
            # exact integers (see _count_dtype), 5-8x cheaper than boolean counts.
            fired = (stacked.amax(dim=(1, 3)) if positions > 1 else stacked.squeeze(3).amax(dim=1)) > 0  # (L, U)
            size = samples * units * positions
            signs = stacked.sign_() if len(idx) > 1 else stacked.sign()  # a stack is our own copy
            nonzero = signs.reshape(len(idx), -1).sum(dim=1, dtype=_count_dtype(size)).long()
            if combine is not None:
                fired, nonzero, copies = combine(fired, nonzero)
                size = size * copies
            alive = fired.sum(dim=1)
            rows.append(torch.stack([(units - alive).double() / units, (size - nonzero).double() / size], dim=1))
            fired_parts.append(fired.reshape(-1))
        return torch.cat(rows)[order], torch.cat(fired_parts)[unit_order]

    def epoch_dead_fraction(self, fired_in_epoch: torch.Tensor) -> torch.Tensor:
        """Per layer, the share of units that never fired in the steps OR-ed into `fired_in_epoch`."""
        flat = fired_in_epoch.reshape(-1)
        if len(set(self.units)) == 1:
            units = self.units[0]
            return (units - flat.reshape(-1, units).sum(dim=1)).double() / units
        never = [(u - part.sum()).double() / u for u, part in zip(self.units, flat.split(self.units), strict=True)]
        return torch.stack(never)


def activation_stats(outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`ActivationStats` for one list of layer outputs (or of each layer's calls)."""
    return ActivationStats([tuple(unit_view(o).shape) for o in outputs])(outputs)
