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
from collections.abc import Sequence

import torch

from gradwatch.telemetry.tags import GRAD_STATS

_WIDE = (torch.float32, torch.float64)
# Tensors this small share one zero-padded group whatever their sizes: their reductions cost the
# per-operation overhead, not the elements, so fewer groups is what makes them cheap.
SMALL = 4096
# Per dtype: the exponent-bits mask of its integer view, and the range a power-of-two scale keeps
# to (normal numbers, so the scale itself is exact).
_EXPONENT = {torch.float32: (torch.int32, 0x7F800000, 2.0**-126, 2.0**127),
             torch.float64: (torch.int64, 0x7FF0000000000000, 2.0**-1022, 2.0**1023)}
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


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


def _count_dtype(n: int) -> torch.dtype:
    # Sums of 0/1 values are exact integer arithmetic while every partial sum is representable:
    # below 2**24 in float32, below 2**53 in float64. Measured 5-8x cheaper than count_nonzero or
    # a boolean sum (scripts/bench_telemetry.py); the caller turns the counts into int64.
    return torch.float32 if n < 2**24 else torch.float64


class SizeGroups:
    """Tensors of many sizes laid out as a few (k, n) stacks in one flat buffer: one stack per size,
    plus one zero-padded stack for every tensor of at most `SMALL` elements. Reductions over a
    stack cost a few operations per group, not per tensor; `order` puts the rows back in input
    order.

    `stacks(tensors)` copies every tensor into its row with one `torch._foreach_copy_` (widening
    bf16/fp16 to float32 exactly) into a buffer made once per device and dtype; the padding is
    never written, so it stays 0. The stacks are views of that buffer, valid until the next call,
    and the caller may work in them in place. Buffers that live across steps matter on CPU: a
    fresh tensor of more than 128 KiB is fresh memory from the OS (glibc's mmap threshold), and
    its page faults cost more than the arithmetic (measured 2-3x per operation in a training step).
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.groups, self._order = _groups([0 if n <= SMALL else n for n in self.sizes])
        self.row_sizes = [self.sizes[i] for g in self.groups for i in g]
        self.widths = [max(self.sizes[i] for i in g) for g in self.groups]
        self._padded = [len({self.sizes[i] for i in g}) > 1 for g in self.groups]
        self._on: dict = {}
        self._buffers: dict = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
        """On `device`, made once: the row order, each row's element count (float64), and per
        group the mask of real (not padding) elements (None for a group of one size)."""
        if device not in self._on:
            order = torch.tensor(self._order, dtype=torch.int64, device=device)
            counts = torch.tensor(self.row_sizes, dtype=torch.float64, device=device)
            masks = []
            for idx, width, padded in zip(self.groups, self.widths, self._padded, strict=True):
                if not padded:
                    masks.append(None)
                    continue
                sizes = torch.tensor([self.sizes[i] for i in idx], device=device)
                masks.append((torch.arange(width, device=device) < sizes[:, None]).float())
            self._on[device] = order, counts, masks
        return self._on[device]

    def buffer(self, device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Made once per device and dtype: each group's (k, n) view of a zero buffer, and each
        tensor's slot in it (flat, reshaped to the tensors' shapes on first use)."""
        key = (device, dtype)
        if key not in self._buffers:
            total = sum(len(g) * w for g, w in zip(self.groups, self.widths, strict=True))
            flat = torch.zeros(total, dtype=dtype, device=device)
            views, slots, start = [], [None] * len(self.sizes), 0
            for idx, width in zip(self.groups, self.widths, strict=True):
                views.append(flat[start:start + len(idx) * width].view(len(idx), width))
                for position, i in enumerate(idx):
                    offset = start + position * width
                    slots[i] = flat[offset:offset + self.sizes[i]]
                start += len(idx) * width
            self._buffers[key] = views, slots
        return self._buffers[key]

    def stacks(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """One (k, n) stack per group: `tensors` copied into the `dtype` buffer (default: float32,
        or float64 when any input is). Call under no_grad."""
        if dtype is None:
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        views, slots = self.buffer(tensors[0].device, dtype)
        try:
            torch._foreach_copy_(slots, tensors)
        except RuntimeError:  # first use, or other shapes of the same sizes: slots shaped like the tensors
            if len(tensors) != len(slots) or any(t.numel() != n for t, n in zip(tensors, self.sizes, strict=True)):
                raise ValueError(f"expected tensors of sizes {self.sizes}") from None
            slots[:] = [s.reshape(-1).view(t.shape) for s, t in zip(slots, tensors, strict=True)]
            torch._foreach_copy_(slots, tensors)
        return views


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
        self._on: dict = {}

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """Made once per device and dtype: the row order, element counts, masks, 1/sqrt(n - 1),
        and per group two work buffers of its shape."""
        if (device, dtype) not in self._on:
            order, n, masks = self.stacker.constants(device)
            # std = sqrt(centred sum of squares / (n - 1)); a one-element row has a centred sum of 0.
            inverse_root = (n - 1).clamp(min=1).rsqrt()
            largest = max(len(g) * w for g, w in zip(self.stacker.groups, self.stacker.widths, strict=True))
            work = torch.empty(2, largest, dtype=dtype, device=device)
            works = [work[:, :len(g) * w].view(2, len(g), w) for g, w in zip(self.stacker.groups, self.stacker.widths,
                                                                             strict=True)]
            self._on[device, dtype] = order, n, masks, inverse_root, works
        return self._on[device, dtype]

    @torch.no_grad()
    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        table = self.rows(grads)
        global_norm = torch.linalg.vector_norm(table[:, GRAD_STATS.index("norm")])  # float64: no overflow
        global_row = torch.zeros(1, len(GRAD_STATS), dtype=torch.float64, device=table.device)
        global_row[0, GRAD_STATS.index("norm")] = global_norm
        return torch.cat([table, global_row])

    @torch.no_grad()
    def flat(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rows of `__call__` flattened, then the global norm: one float64 vector."""
        table = self.rows(grads)
        global_norm = torch.linalg.vector_norm(table[:, GRAD_STATS.index("norm")], dim=0, keepdim=True)
        return torch.cat([table.reshape(-1), global_norm])

    @torch.no_grad()
    def rows(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-gradient rows (no global norm row), float64, in input order."""
        stacks = self.stacker.stacks(grads)
        order, n, masks, inverse_root, works = self._constants(stacks[0].device, stacks[0].dtype)
        parts = [self._group_sums(g, mask, work) for g, mask, work in zip(stacks, masks, works, strict=True)]
        # (k, 6): the scaled rows' sum, norm and centred sum of squares, abs_max, scale and
        # non-finite count; and (k,) non-zero counts (exact integers).
        sums = (torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]).double()
        nonzero = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        total, norm, squares, abs_max, scale, nonfinite = sums.unbind(1)
        mean = total * scale / n
        std = squares.sqrt() * scale * inverse_root
        # The float32 sum of squares holds abs_max**2 as one of its terms: its root is >= abs_max
        # but for the last bit; keep the inequality exact.
        norm = torch.maximum(norm * scale, abs_max)
        zero_fraction = (n - nonzero) / n
        return torch.stack([mean, std, zero_fraction, norm, abs_max, nonfinite], dim=1).index_select(0, order)

    @staticmethod
    def _group_sums(g: torch.Tensor, mask: torch.Tensor | None, work: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a (k, n) stack (zero-padded where `mask` is given; scaled in place) and a (2, k, n)
        work buffer: (k, 6) sums of the rows scaled into [1, 2) (sum, norm, centred sum of
        squares), the unscaled abs_max, the scale and the non-finite count; and (k,) non-zero
        counts. The cheapest exact operations measured (scripts/bench_telemetry.py): a two-pass
        variance instead of torch.std_mean along a dimension, integer or float sums of 0/1 values
        instead of boolean counts (5-10x cheaper)."""
        k, n = g.shape
        magnitude = torch.abs(g, out=work[0])
        abs_max = magnitude.amax(dim=1)
        scale = _scale_of(abs_max)
        x = g.mul_(scale.reciprocal()[:, None])  # a power of two: the same values as g / scale
        total = x.sum(dim=1)
        norm = torch.linalg.vector_norm(x, dim=1)
        real = n if mask is None else mask.sum(dim=1)
        centred = torch.sub(x, (total / real)[:, None], out=work[1])
        if mask is not None:
            centred.mul_(mask)  # padding is not a sample
        squares = centred.square_().sum(dim=1)
        # x - x is 0 for a finite x and NaN for inf and NaN.
        count_dtype = x.dtype if x.dtype == torch.float64 else _count_dtype(n)
        nonfinite = torch.sub(x, x, out=centred).nan_to_num_(nan=1.0).sum(dim=1, dtype=count_dtype)
        # |g| as an integer is 0 for +-0 and positive otherwise (NaN included): min(bits, 1) is 0/1.
        bits = magnitude.view(_INT_VIEW[magnitude.dtype]).clamp_(max=1)
        nonzero = bits.sum(dim=1, dtype=torch.int32 if n < 2**31 else torch.int64)
        return torch.stack([total, norm, squares, abs_max, scale, nonfinite], dim=1), nonzero


def gradient_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`GradientStats` for one list of gradients."""
    return GradientStats([g.numel() for g in grads])(grads)


class UpdateRatio:
    """||theta_after - theta_before|| / ||theta_before|| per parameter, for one optimizer step.

    `before(params)` keeps a float64 copy of the weights (laid out as `SizeGroups`, one
    `_foreach_copy_`) and their norms; `__call__(kept, params)` subtracts the weights from it in
    place (one `_foreach_sub_`) and gives the ratios, float64 on the weights' device: inf for
    weights that were all 0 and moved, 0 for weights that did not move. float64 squares of
    float32 (or half) weights neither overflow nor underflow. `kept` is valid until the next
    `before`.

    >>> w = torch.tensor([3.0, 4.0]); ratio = UpdateRatio([2]); kept = ratio.before([w])
    >>> ratio(kept, [w + torch.tensor([0.0, 0.5])]).tolist()
    [0.1]
    """

    def __init__(self, sizes: Sequence[int]):
        self.stacker = SizeGroups(sizes)

    @staticmethod
    def _norms(views: list[torch.Tensor]) -> torch.Tensor:
        norms = [torch.linalg.vector_norm(view, dim=1) for view in views]  # padding is 0: adds nothing
        return torch.cat(norms) if len(norms) > 1 else norms[0]

    @torch.no_grad()
    def before(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        views = self.stacker.stacks(params, dtype=torch.float64)
        return views, self._norms(views)

    @torch.no_grad()
    def __call__(self, kept: tuple[list[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
        views, before = kept
        order = self.stacker.constants(before.device)[0]
        slots = self.stacker.buffer(before.device, torch.float64)[1]
        torch._foreach_sub_(slots, params)  # before - after
        moved = self._norms(views)
        return torch.where(moved == 0, 0.0, moved / before).index_select(0, order)


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
        # Grouped by the shapes as given: a group's outputs stack as they come.
        self.groups, self._order = _groups([tuple(s) for s in shapes])
        self._on: dict = {}
        self._buffers: dict = {}

    @staticmethod
    def _view_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
        if len(shape) == 1:
            return 1, shape[0], 1
        positions = 1
        for size in shape[2:]:
            positions *= size
        return shape[0], shape[1], positions

    def _constants(self, device: torch.device) -> tuple:
        """Made once per device: the row order, where each layer's units sit in the grouped
        `fired` vector (to put them in layer order), and per group (units, outputs) as float64."""
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

    def _signs(self, group: list[torch.Tensor], number: int) -> torch.Tensor:
        """The signs of a group's outputs, stacked, in a buffer kept across steps (see `SizeGroups`)."""
        first = group[0]
        key = (number, first.device, first.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[1:] != first.shape:
            buffer = self._buffers[key] = torch.empty(len(group), *first.shape, dtype=first.dtype, device=first.device)
        if len(group) == 1:
            return torch.sign(first, out=buffer[0])
        try:
            return torch.stack(group, out=buffer).sign_()
        except RuntimeError:  # the same units and positions, from outputs of other shapes
            return torch.stack([unit_view(t) for t in group]).sign_()

    @torch.no_grad()
    def __call__(self, outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`outputs`: per layer, its output, or the outputs of its calls in this step."""
        tensors = [o if isinstance(o, torch.Tensor) else unit_view(o) for o in outputs]
        order, unit_order = self._constants(tensors[0].device)
        rows, fired_parts = [], []
        for number, idx in enumerate(self.groups):
            samples, units, positions = self.shapes[idx[0]]
            size = samples * units * positions
            signs = self._signs([tensors[i] for i in idx], number)
            # ReLU outputs are >= 0: an output is non-zero iff its sign is 1 (NaN's sign is 0).
            # Per unit, the float sum of 0/1 values over samples and positions is an exact integer
            # count (see _count_dtype), 5-8x cheaper than a boolean count; a unit fired iff its
            # count is > 0.
            if positions == 1:
                per_unit = signs.reshape(len(idx), samples, units).sum(dim=1, dtype=_count_dtype(size))
            else:
                per_unit = signs.reshape(len(idx), samples, units, positions).sum(dim=(1, 3), dtype=_count_dtype(size))
            fired = per_unit > 0  # (L, U)
            dead = units - fired.sum(dim=1)
            zeros = size - per_unit.sum(dim=1, dtype=torch.float64)
            rows.append(torch.stack([dead.double() / units, zeros / size], dim=1))
            fired_parts.append(fired.reshape(-1))
        if len(rows) == 1:
            return rows[0].index_select(0, order), fired_parts[0].index_select(0, unit_order)
        return torch.cat(rows).index_select(0, order), torch.cat(fired_parts).index_select(0, unit_order)

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
