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

On a CPU, contiguous float32 tensors (the usual case) go instead through fused kernels
(`gradwatch.telemetry.kernels`, numba), which read each tensor where it lies in one or two
passes, with float64 sums, and leave the finished rows in host memory: the same numbers, 3-10x
cheaper in a training step. Set `HOST_KERNELS = False` to use torch operations everywhere.

On CUDA, the gradient statistics, the update ratio and the ReLU counts go through multi-tensor
Triton kernels (`gradwatch.telemetry.gpu`, docs/gpu.md): each tensor read in place, a fixed
number of launches a step, float64 sums, no copy of the gradients or the activations, the
weights before a step kept once in their own dtype. The torch operations here remain for what
neither kernel set reads (half precision on a CPU, other devices, no triton).
`DEVICE_KERNELS = False` turns the Triton path off; `DEVICE_KERNELS_ON_CPU = True` sends CPU
tensors the numba kernels do not take through it when triton interprets (the tests).
"""

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gradwatch.telemetry.tags import GRAD_STATS

# Sizes whose tensors hold fewer elements than this in all share one zero-padded group: their
# reductions cost the per-operation overhead, not the elements, so fewer groups is what makes
# them cheap; a size with more has a group of its own, so no padding multiplies its elements.
SMALL = 4096
# Per dtype: the exponent-bits mask of its integer view, and the range a power-of-two scale keeps
# to (normal numbers, so the scale itself is exact).
_EXPONENT = {torch.float32: (torch.int32, 0x7F800000, 2.0**-126, 2.0**127),
             torch.float64: (torch.int64, 0x7FF0000000000000, 2.0**-1022, 2.0**1023)}
# Devices whose activation counts go through sign buffers kept across steps (cheapest there);
# on the others each ReLU output is counted in place (no activation-sized buffer): by the device
# kernels where they read it, else by torch operations.
SIGN_BUFFER_DEVICES = frozenset({"cpu"})
HOST_KERNELS = True  # use gradwatch.telemetry.kernels for float32 CPU tensors (when numba imports)
_kernels = None  # the module once imported; False when numba is missing
# Use gradwatch.telemetry.gpu (Triton's multi-tensor kernels) for CUDA tensors; and for the CPU
# tensors the numba kernels do not take, when triton interprets (the tests' way to run them).
DEVICE_KERNELS = True
DEVICE_KERNELS_ON_CPU = False
_gpu = None  # the module once imported; False when triton is missing or failed to run a kernel


_SHAPE = operator.attrgetter("shape")
_DTYPE_CPU = operator.attrgetter("dtype", "is_cpu")  # one pass over the tensors for both
_DTYPE_DEVICE = operator.attrgetter("dtype", "device")
_FLOAT32_CPU = {(torch.float32, True)}


def _host_kernels():
    """`gradwatch.telemetry.kernels` when they are to be used (HOST_KERNELS) and numba imports, else None."""
    global _kernels
    if not HOST_KERNELS:
        return None
    if _kernels is None:
        try:
            from gradwatch.telemetry import kernels
        except ImportError:  # pragma: no cover - numba is a dependency
            kernels = None
        _kernels = kernels if kernels is not None and kernels.available() else False
    return _kernels or None


def _device_kernels(tensor: torch.Tensor):
    """`gradwatch.telemetry.gpu` when its kernels are to read `tensor` (CUDA, or the CPU when
    DEVICE_KERNELS_ON_CPU and triton interprets), else None. Imported on first use: triton
    loads in ~1 s, and a CPU run never needs it."""
    global _gpu
    if not DEVICE_KERNELS or not (tensor.is_cuda or DEVICE_KERNELS_ON_CPU and tensor.is_cpu):
        return None
    if _gpu is None:
        from gradwatch.telemetry import gpu

        _gpu = gpu if gpu.triton is not None else False
    return _gpu if _gpu and _gpu.usable(tensor) else None


def _device_plan(cached: tuple | None, tensors: Sequence[torch.Tensor], sizes: list[int], checked: bool,
                 make: Callable) -> tuple[tuple | None, bool, bool]:
    """((key, plan), new, placed): the device kernels' plan for these tensors, `cached` (a (key,
    plan) pair) when their dtypes and device are its key, else `make(gpu, dtypes, device)` (new);
    None where the kernels do not apply (no triton, a dtype they do not read, tensors on several
    devices, or of other sizes). `placed`: the tensors lie at the addresses the plan last read.
    `checked`: the caller vouches for the sizes."""
    gpu = _device_kernels(tensors[0])
    if gpu is None:
        return None, False, False
    if cached is not None and cached[1].layout.addresses.at_last(tensors):
        # The tensors the plan last read, or others at their addresses, which a caller hands only
        # for the same parameters: autograd gives a gradient its parameter's dtype, device and size.
        return cached, False, True
    key = tuple(map(_DTYPE_DEVICE, tensors))
    sized = checked or list(map(torch.Tensor.numel, tensors)) == sizes
    if cached is not None and cached[0] == key:
        return (cached if sized else None), False, False
    device = tensors[0].device
    if not sized or any(d not in gpu.DTYPES or v != device for d, v in key):
        return None, False, False
    return (key, make(gpu, [d for d, _ in key], device)), True, False


def _gpu_module():
    """`gradwatch.telemetry.gpu` itself, for finishing numbers its kernels made: they stay valid
    after the kernels were turned off for the process (`_first_launch`), so `_gpu` may be False."""
    from gradwatch.telemetry import gpu

    return gpu


def _first_launch(run: Callable, *args):
    """`run(*args)`, or None after a warning if triton cannot build or run its kernels here (a
    GPU without the compiler triton needs): the device kernels are then off for the process."""
    global _gpu
    try:
        return run(*args)
    except Exception as error:  # triton's compile and driver errors have no common base
        import logging

        logging.getLogger(__name__).warning("gradient statistics: Triton kernels unavailable (%s: %s); "
                                            "using torch operations", type(error).__name__, error)
        _gpu = False
        return None


def _host_addresses(tensors: Sequence[torch.Tensor], shapes: list, checked: bool = False) -> np.ndarray | None:
    """The tensors' addresses when the CPU kernels can read them all (contiguous float32 CPU
    tensors of the expected `shapes`, numels or `torch.Size`s, and numba present), else None.
    `checked`: the caller vouches for the shapes. The caller keeps the tensors alive meanwhile.
    Checked with `map` (C loops): a Python loop over a 100-layer net's tensors cost 120 us a
    call, this 60 us."""
    if _host_kernels() is None or not tensors or len(tensors) != len(shapes):
        return None
    # A sparse tensor is not contiguous: it stops at the second test, before `data_ptr`.
    if (set(map(_DTYPE_CPU, tensors)) != _FLOAT32_CPU or not all(map(torch.Tensor.is_contiguous, tensors))
            or not checked
            and list(map(torch.Tensor.numel if isinstance(shapes[0], int) else _SHAPE, tensors)) != shapes):
        return None
    return np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors))


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
    plus one zero-padded stack for the sizes whose tensors hold fewer than `SMALL` elements in
    all (a 50-layer net of width 32: its 48 32x32 weights, then biases and the rest). Reductions over a
    stack cost a few operations per group, not per tensor; `order` puts the rows back in input
    order.

    `stacks(tensors)` copies the tensors into a buffer made once per device and dtype (`rows`
    copies of the layout: `UpdateRatio` keeps the weights before and after), with one
    `torch.stack(..., out=)` per distinct shape (a C++ loop of memory copies: 100 tensors cost
    what 5 do, where a copy per tensor costs ~5 us each) and, for a padded group, one gather
    that also writes its zero padding; bf16/fp16 widen exactly to float32 in one more copy. The
    stacks are views of that buffer, valid until the next call, and the caller may work in them
    in place. Buffers that live across steps matter on CPU: a fresh tensor of more than 128 KiB
    is fresh memory from the OS (glibc's mmap threshold), and its page faults cost more than the
    arithmetic (measured 2-3x per operation inside a training step).
    """

    def __init__(self, sizes: Sequence[int], rows: int = 1):
        self.sizes = list(sizes)
        self.rows = rows
        # A size whose tensors hold fewer than SMALL elements in all shares the padded group (key 0).
        totals: dict[int, int] = defaultdict(int)
        for n in self.sizes:
            totals[n] += n
        self.groups, self._order = _groups([n if totals[n] >= SMALL else 0 for n in self.sizes])
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

    def buffer(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
        """Made once per device and dtype: the (rows, total) zero buffer, each group's
        (rows, k, n) view of it, and the copy plans (by row and source dtype)."""
        key = (device, dtype)
        if key not in self._buffers:
            total = sum(len(g) * w for g, w in zip(self.groups, self.widths, strict=True))
            flat = torch.zeros(self.rows, total, dtype=dtype, device=device)
            views, start = [], 0
            for idx, width in zip(self.groups, self.widths, strict=True):
                views.append(flat[:, start:start + len(idx) * width].view(self.rows, len(idx), width))
                start += len(idx) * width
            self._buffers[key] = flat, views, {}
        return self._buffers[key]

    def stacks(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None, row: int = 0
               ) -> list[torch.Tensor]:
        """One (k, n) stack per group: `tensors` copied into row `row` of the `dtype` buffer
        (default: float32, or float64 when any input is). Call under no_grad."""
        if dtype is None:
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat, views, plans = self.buffer(tensors[0].device, dtype)
        source = tensors[0].dtype
        plan = plans.get((row, source))
        try:
            if plan is None:
                raise RuntimeError("no plan yet")
            plan(tensors)
        except RuntimeError:  # first use, or tensors of other shapes or dtypes than the plan's
            if len(tensors) != len(self.sizes) or any(t.numel() != n for t, n in zip(tensors, self.sizes, strict=True)):
                raise ValueError(f"expected tensors of sizes {self.sizes}") from None
            plan = plans[row, source] = self._plan(flat[row], tensors)
            plan(tensors)
        return [view[row] for view in views]

    def _plan(self, target: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Callable[[Sequence[torch.Tensor]], None]:
        """The copy of `tensors` (their shapes and dtypes now) into `target`, one flat row."""
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:  # mixed dtypes: a copy per tensor
            slots, start = [None] * len(tensors), 0
            for idx, width in zip(self.groups, self.widths, strict=True):
                for position, i in enumerate(idx):
                    offset = start + position * width
                    slots[i] = target[offset:offset + self.sizes[i]].view(tensors[i].shape)
                start += len(idx) * width
            return lambda ts: torch._foreach_copy_(slots, ts)
        (source,) = dtypes
        # Stack into `target` itself, or into a buffer of the tensors' dtype copied (widened) after.
        staged = target if source == target.dtype else torch.zeros_like(target, dtype=source)
        steps: list[tuple[Callable, torch.Tensor]] = []
        gathers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        start = 0
        for idx, width, padded in zip(self.groups, self.widths, self._padded, strict=True):
            region = staged[start:start + len(idx) * width]
            by_shape: dict = defaultdict(list)
            for i in idx:
                by_shape[tuple(tensors[i].shape)].append(i)
            if not padded and len(by_shape) == 1:
                steps.append((_getter(idx), region.view(len(idx), *tensors[idx[0]].shape)))
            else:  # dense by shape, then laid out in padded rows by a gather (padding reads a 0)
                dense = torch.zeros(sum(self.sizes[i] for i in idx) + 1, dtype=source, device=target.device)
                offsets, offset = {}, 0
                for shape, members in by_shape.items():
                    size = self.sizes[members[0]]
                    steps.append((_getter(members), dense[offset:offset + len(members) * size].view(len(members),
                                                                                                      *shape)))
                    for number, i in enumerate(members):
                        offsets[i] = offset + number * size
                    offset += len(members) * size
                index = torch.full((len(idx), width), offset, dtype=torch.int64)  # `offset`: the trailing 0
                for position, i in enumerate(idx):
                    index[position, :self.sizes[i]] = torch.arange(offsets[i], offsets[i] + self.sizes[i])
                gathers.append((dense, index.reshape(-1).to(target.device), region))
            start += len(idx) * width

        def run(ts: Sequence[torch.Tensor]) -> None:
            for get, out in steps:
                torch.stack(get(ts), out=out)
            for dense, index, out in gathers:
                torch.index_select(dense, 0, index, out=out)
            if staged is not target:
                target.copy_(staged)

        return run


def _getter(indices: list[int]) -> Callable[[Sequence], tuple]:
    """`tensors -> tuple(tensors[i] for i in indices)`, at C speed."""
    if len(indices) == 1:
        only = indices[0]
        return lambda items: (items[only],)
    return operator.itemgetter(*indices)


class _GroupViews:
    """One size group's persistent views: its stack, work rows and slots of the raw sums."""

    def __init__(self, work: "_Work", span: slice, rows: slice, shape: tuple[int, int], mask: torch.Tensor | None):
        self.x = work.flat[span].view(shape)
        self.magnitude = work.work[3, span].view(shape)
        self.centred = work.work[0, span].view(shape)
        self.terms = work.work[:, span].view(4, *shape)
        self.mask = mask
        self.inverse = work.inverse[rows, None]
        self.mean = work.mean[rows, None]
        self.sums = work.sums[:, rows]
        self.total = work.rest[0, rows]
        self.abs_max = work.rest[1, rows]
        self.centred_total = work.rest[3, rows]


class _Work:
    """`GradientStats`' buffers on one device for one dtype, and views of them, made once.

    `raw` (8, rows) holds per row, in grouped order: the centred sum of squares, the sum of
    squares, the non-finite and non-zero counts, the sum (all of the row scaled into [1, 2)),
    abs_max, the scale and the centred sum. float32 sums of 0/1 values are exact integers below 2**24 elements
    (see _count_dtype); a larger group, or float64 gradients, make every sum float64."""

    def __init__(self, stacker: SizeGroups, device: torch.device, dtype: torch.dtype):
        self.flat = stacker.buffer(device, dtype)[0][0]
        self.work = torch.zeros(4, self.flat.numel(), dtype=dtype, device=device)
        rows = len(stacker.sizes)
        wide = dtype == torch.float64 or max(stacker.widths) >= 2**24
        self.sum_dtype = torch.float64 if wide else dtype
        # sums: rows 0-3 of `raw`; rest (sum, abs_max, scale, centred sum): rows 4-7, in the gradients' dtype.
        if self.sum_dtype == dtype:
            self.raw = torch.zeros(8, rows, dtype=dtype, device=device)
            self.sums, self.rest = self.raw[:4], self.raw[4:]
        else:  # raw is their concatenation, made by `GradientStats.sums`
            self.raw = None
            self.sums = torch.zeros(4, rows, dtype=self.sum_dtype, device=device)
            self.rest = torch.zeros(4, rows, dtype=dtype, device=device)
        self.inverse, self.mean = torch.zeros(2, rows, dtype=dtype, device=device)
        self.n = torch.tensor(stacker.row_sizes, dtype=dtype, device=device)
        int_dtype, self.exponent_mask, low, high = _EXPONENT[dtype]
        # The scale: the exponent bits of a row's abs_max, kept to normal numbers (so dividing by it
        # is exact: 0 gives the smallest normal number, inf and NaN the largest), as integers.
        numpy_float = np.float64 if dtype == torch.float64 else np.float32
        self.low, self.high = (int(np.array(v, dtype=numpy_float).view(f"i{np.dtype(numpy_float).itemsize}"))
                               for v in (low, high))
        self.scale = self.rest[2]
        self.scale_bits = self.rest[2].view(int_dtype)
        self.abs_max_bits = self.rest[1].view(int_dtype)
        masks = stacker.constants(device)[2]
        self.groups, start, row = [], 0, 0
        for idx, width, mask in zip(stacker.groups, stacker.widths, masks, strict=True):
            end = start + len(idx) * width
            self.groups.append(_GroupViews(self, slice(start, end), slice(row, row + len(idx)), (len(idx), width),
                                           None if mask is None else mask.to(dtype)))
            start, row = end, row + len(idx)


def rows_from_sums(n, mean, centred, squares, zeros, nonfinite, abs_max, xp, scale=None, root=None, order=None):
    """Per tensor, its size `n`, mean, sum of squares about the mean (`centred`), sum of squares,
    zero and non-finite counts and largest magnitude (NaN when it holds one) -> the rows (mean,
    std, zero_fraction, norm, abs_max, nonfinite), in `order` (None: as given), and the global
    norm; float64, `xp` numpy (on the host) or torch (on the device).

    `scale`: the two sums are of each tensor's values divided by it (a power of two that kept
    their squares in range); its sums then cannot be added across tensors, so the global norm
    adds the norms' squares (float64: no overflow), else the sums of squares themselves.
    std is unbiased: sqrt(centred) * scale / `root` where the caller keeps root = sqrt(max(n - 1,
    1)) (its centred sum is 0 for one value), else sqrt(centred / (n - 1)) as torch rounds it, 0
    for one value and NaN for none."""
    if root is None and xp is np and n.min() > 1:  # the usual case, in a third of the operations
        std = np.sqrt(centred / (n - 1))
    elif root is None:
        std = xp.where(n > 1, xp.sqrt(centred / (n - 1).clip(1)), xp.where(n == 1, 0.0, math.nan))
    else:
        std = xp.sqrt(centred) * scale / root
    # The root of the sum of squares holds abs_max**2 as one of its terms: it is >= abs_max but
    # may round below it; keep the inequality exact (and NaN where abs_max is).
    root_squares = xp.sqrt(squares) if scale is None else xp.sqrt(squares) * scale
    norm = xp.maximum(root_squares, abs_max)
    columns = (mean, std, zeros / n, norm, abs_max, nonfinite)
    if xp is np:  # column by column into one array: a third of `np.stack`'s host time (every logged step)
        table = np.empty((len(norm), len(columns)))
        for i, column in enumerate(columns):
            table[:, i] = column
    else:
        table = xp.stack(columns, 1)
    global_norm = xp.sqrt(squares.sum() if scale is None else (norm * norm).sum())
    return (table if order is None else table[order]), global_norm


def ratio_from_norms(before, moved, xp, order=None):
    """||after - before|| / ||before|| per tensor from the two norms, in `order` (None: as given):
    0 where nothing moved, inf where weights that were all 0 moved; `xp` numpy or torch."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = xp.where(moved == 0, 0.0, moved / before)
    return ratio if order is None else ratio[order]


def _finish_gradient_rows(raw, n, root, order, xp):
    """`rows_from_sums` of `_Work.raw` as float64 (its sums scaled; rows in grouped order)."""
    centred_squares, squares, nonfinite, nonzero, total, abs_max, scale, centred_total = raw
    # The corrected two-pass variance: minus (sum of x - mean)**2 / n, the first-order error of a
    # float32 mean (a mean 1e7 times the spread needs it for 1e-5).
    centred = (centred_squares - centred_total * centred_total / n).clip(0.0)
    return rows_from_sums(n, total * scale / n, centred, squares, n - nonzero, nonfinite, abs_max, xp, scale=scale,
                          root=root, order=order)


class GradientStats:
    """Statistics of each gradient, as rows (mean, std, zero_fraction, norm, abs_max, nonfinite).

    std is torch's unbiased std, and 0.0 for a one-element tensor. A last row holds the global norm
    (L2 over all gradients) in its `norm` column, the other columns 0. The table is float64, on
    the gradients' device.

    On CUDA the Triton kernels read the gradients in place (`gpu.GradientSums`; `pending` then
    returns their raw sums and `_finish_device`). On the torch-operations path the gradients
    are copied into one flat buffer (`SizeGroups`); every element-wise step runs
    once over that whole buffer and every reduction once per group, into buffers kept across
    calls: about 15 + 5 per group tensor operations a step, whatever the number of parameters
    (in a training step on a CPU each costs ~10 us of overhead, more than the arithmetic).
    `sums(grads)` stops there, on the device; `finish(sums)` does the per-row arithmetic on the
    host after the step's one transfer (numpy, a few microseconds instead of ~12 more tensor
    operations); `__call__` does both on the device.

    >>> GradientStats([2, 1])([torch.tensor([3.0, 4.0]), torch.tensor([0.0])]).tolist()[0]
    [3.5, 0.7071067811865476, 0.0, 5.0, 4.0, 0.0]
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.stacker = SizeGroups(self.sizes)
        self._on: dict = {}
        order = self.stacker._order
        self._order = None if order == sorted(order) else np.asarray(order)
        self._n = np.asarray(self.stacker.row_sizes, dtype=np.float64)
        self._root = np.sqrt(np.maximum(self._n - 1, 1))
        # The CPU kernels' sizes, scratch and output (rows flattened, then the global norm).
        self._host_sizes = np.asarray(self.sizes, dtype=np.int64) if min(self.sizes, default=0) > 0 else None
        self._host_tops = np.zeros(len(self.sizes), dtype=np.int32)
        self._host_out = np.zeros(len(self.sizes) * len(GRAD_STATS) + 1)
        self._device: tuple | None = None  # (dtypes and device, gpu.GradientSums)
        self._sizes = np.asarray(self.sizes, dtype=np.float64)

    def pending(self, grads: Sequence[torch.Tensor], checked: bool = False
                ) -> tuple[torch.Tensor | np.ndarray, Callable[[np.ndarray], np.ndarray] | None]:
        """This step's numbers, on the device (a tensor) or already on the host (the CPU
        kernels' numpy array), and what finishes them on the host: the rows of `__call__`
        flattened, then the global norm, once `finish` (None: nothing to do) has had them.
        Valid until the next call. `checked`: the gradients of float32 CPU parameters of these
        sizes (autograd keeps a gradient's dtype, device and size those of its parameter), so
        only their layout is checked here."""
        addresses = None
        kernels = _host_kernels()
        if self._host_sizes is not None and kernels is not None:
            if checked and len(grads) == len(self.sizes):
                if all(map(torch.Tensor.is_contiguous, grads)):
                    addresses = np.fromiter(map(torch.Tensor.data_ptr, grads), dtype=np.int64, count=len(grads))
            else:
                addresses = _host_addresses(grads, self.sizes)
        if addresses is None:
            values = self._device_sums(grads, checked) if grads else None
            if values is not None:
                return values, self._finish_device
            return self.sums(grads), self.finish
        kernels.gradient_rows(addresses, self._host_sizes, self._host_tops, self._host_out)
        return self._host_out, None

    def _device_sums(self, grads: Sequence[torch.Tensor], checked: bool) -> torch.Tensor | None:
        """The multi-tensor kernels' raw sums (`gpu.GradientSums`), or None where they do not apply."""
        entry, new, placed = _device_plan(self._device, grads, self.sizes, checked,
                                          lambda gpu, dtypes, device: gpu.GradientSums(self.sizes, dtypes, device))
        if entry is None:
            return None
        if not new:
            return entry[1](grads, placed)
        self._device = None  # the last layout's buffers go first
        values = _first_launch(entry[1], grads)
        self._device = None if values is None else entry
        return values

    def _finish_device(self, raw: np.ndarray) -> np.ndarray:
        """`gpu.GradientSums`' sums on the host -> the rows of `__call__` flattened, then the global norm."""
        return _gpu_module().finish_gradient_rows(raw, self._sizes)

    @torch.no_grad()
    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        values, finish = self.pending(grads)
        if finish is None or finish == self._finish_device:  # finished on the host
            values = values if finish is None else finish(values.cpu().numpy())
            rows = len(self.sizes)
            table = torch.zeros(rows + 1, len(GRAD_STATS), dtype=torch.float64)
            table[:rows] = torch.from_numpy(values[:-1]).view(rows, len(GRAD_STATS))
            table[rows, GRAD_STATS.index("norm")] = float(values[-1])
            return table if finish is None else table.to(grads[0].device)
        raw = values.double()
        device = raw.device
        n, root = torch.from_numpy(self._n).to(device), torch.from_numpy(self._root).to(device)
        order = None if self._order is None else torch.from_numpy(self._order).to(device)
        table, global_norm = _finish_gradient_rows(raw, n, root, order, torch)
        global_row = torch.zeros(1, len(GRAD_STATS), dtype=torch.float64, device=device)
        global_row[0, GRAD_STATS.index("norm")] = global_norm
        return torch.cat([table, global_row])

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """`sums` on the host (any float dtype) -> the rows of `__call__` flattened, then the
        global norm (float64)."""
        raw = np.asarray(raw, dtype=np.float64).reshape(8, -1)
        table, global_norm = _finish_gradient_rows(raw, self._n, self._root, self._order, np)
        return np.append(table.reshape(-1), global_norm)

    @torch.no_grad()
    def sums(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The (8, rows) raw sums of `_Work` on the gradients' device; valid until the next call."""
        self.stacker.stacks(grads)
        w = self._work(grads[0].device, torch.float64 if any(g.dtype == torch.float64 for g in grads)
                       else torch.float32)
        x, work, groups = w.flat, w.work, w.groups
        # Scale each row by the power of two of its largest magnitude: its largest |x| is in
        # [1, 2), so no square overflows or underflows (see the module docstring).
        torch.abs(x, out=work[3])
        for g in groups:
            torch.amax(g.magnitude, dim=1, out=g.abs_max)
        torch.bitwise_and(w.abs_max_bits, w.exponent_mask, out=w.scale_bits).clamp_(w.low, w.high)
        torch.reciprocal(w.scale, out=w.inverse)
        for g in groups:
            g.x.mul_(g.inverse)  # a power of two: the same values as x / scale
            torch.sum(g.x, dim=1, out=g.total)
        torch.div(w.rest[0], w.n, out=w.mean)
        for g in groups:  # two-pass variance: centred, then squared
            torch.sub(g.x, g.mean, out=g.centred)
            if g.mask is not None:
                g.centred.mul_(g.mask)  # padding is not a sample
            torch.sum(g.centred, dim=1, out=g.centred_total)
        work[0].square_()
        torch.mul(x, x, out=work[1])
        torch.sub(x, x, out=work[2])  # 0 for a finite x, NaN for inf and NaN
        # Rows 2 and 3 become 0/1: non-finite, and non-zero (NaN != 0; torch's sign(NaN) is 0).
        work[2:].nan_to_num_(nan=1.0).sign_()
        # Float sums of 0/1 values: exact integers, 5-10x cheaper than boolean counts.
        for g in groups:
            torch.sum(g.terms, dim=2, dtype=w.sum_dtype, out=g.sums)
        return w.raw if w.raw is not None else torch.cat([w.sums, w.rest.to(w.sum_dtype)])

    def _work(self, device: torch.device, dtype: torch.dtype) -> _Work:
        if (device, dtype) not in self._on:
            self._on[device, dtype] = _Work(self.stacker, device, dtype)
        return self._on[device, dtype]


def gradient_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """`GradientStats` for one list of gradients."""
    return GradientStats([g.numel() for g in grads])(grads)


class UpdateRatio:
    """||theta_after - theta_before|| / ||theta_before|| per parameter, for one optimizer step.

    On CUDA, `before(params)` keeps the weights in their own dtype and one Triton kernel measures
    the change in float64 (`gpu.UpdateNorms`, which is then `kept`). On the torch-operations
    path, `before(params)` keeps a float64 copy of the weights (laid out as `SizeGroups`);
    `pending(kept, params)` gives what the step's ratios need, and `finish` (when not None)
    makes them on the host: `norms` copies the weights again beside the kept ones and gives
    (2, k) ||before|| and ||after - before|| on the device. `__call__(kept, params)` gives the
    ratios on the weights' device, float64. inf for weights that were all 0 and moved, 0 for
    weights that did not move. float64 squares of float32 (or half) weights neither overflow nor
    underflow. On a CPU, float32 weights are kept as a float32 copy by a kernel that also sums
    their squares, and the change is summed in float64 by another (exact: the difference of two
    float32 numbers is a float64 number). `kept` is valid until the next `before`.

    Steps logged one after another (the usual `every_n_steps=1`) need the weights after one step
    as the weights before the next: `pending(..., carry=True)` keeps them on the CPU kernels'
    path in the same pass that measures the change (the weights just written by the optimizer,
    in cache; one pass less over them a step), and `before(params, reuse=True)` then takes that
    copy instead of copying again.

    >>> w = torch.tensor([3.0, 4.0]); ratio = UpdateRatio([2]); kept = ratio.before([w])
    >>> ratio(kept, [w + torch.tensor([0.0, 0.5])]).tolist()
    [0.1]
    """

    def __init__(self, sizes: Sequence[int]):
        self.stacker = SizeGroups(sizes, rows=2)  # row 0: before; row 1: after, then after - before
        order = self.stacker._order
        self._order = None if order == sorted(order) else np.asarray(order)
        self._out: dict = {}
        # The CPU kernels' copy (float32, end to end), squared norms before, and ratios.
        self._host_sizes = np.asarray(sizes, dtype=np.int64)
        self._host_kept: np.ndarray | None = None
        self._host_params: np.ndarray | None = None  # their addresses at `before`
        self._host_list: list[int] | None = None  # the same, as a list
        self._host_before = np.zeros(len(self._host_sizes))
        self._host_ratio = np.zeros(len(self._host_sizes))
        # What `pending(..., carry=True)` kept: the weights after that step, for `before(reuse=True)`.
        self._carried: torch.Tensor | np.ndarray | None = None
        self._before_row = 0  # torch path: the row of the weights before in the (2, total) buffer
        self._device: tuple | None = None  # (dtypes and device, gpu.UpdateNorms): kept by the device kernels

    def before(self, params: Sequence[torch.Tensor], reuse: bool = False) -> torch.Tensor | np.ndarray:
        """The weights kept for `pending`/`__call__` after the step; `reuse`: the copy the last
        `pending(..., carry=True)` kept, if the last call was one. (no_grad only around torch
        operations: entering it costs ~5 us in a training step.)"""
        carried, self._carried = self._carried, None
        if reuse and carried is not None:  # nothing of the weights is read: no check needed
            return carried
        addresses = self._param_addresses(params)
        if addresses is not None:
            if self._host_kept is None:
                self._host_kept = np.zeros(int(self._host_sizes.sum()), dtype=np.float32)
            _host_kernels().keep(addresses, self._host_sizes, self._host_kept, self._host_before)
            return self._host_kept
        kept = self._device_keep(params) if params else None
        if kept is not None:
            return kept
        self._before_row = 0
        with torch.no_grad():
            self.stacker.stacks(params, dtype=torch.float64, row=0)
        return self.stacker.buffer(params[0].device, torch.float64)[0]

    def _device_keep(self, params: Sequence[torch.Tensor]):
        """The weights copied in their own dtype by the device kernels' `gpu.UpdateNorms` (which
        is `kept`), or None where they do not apply."""
        entry, new, _ = _device_plan(self._device, params, self.stacker.sizes, False,
                                     lambda gpu, dtypes, device: gpu.UpdateNorms(self.stacker.sizes, dtypes, device))
        if entry is None:
            return None
        kept = entry[1].keep(params)
        if new:
            self._device = None  # the last layout's copy of the weights goes first
            # Both kernels built and run once (the weights equal their copy: they change nothing),
            # so that a compile failure of either falls back here, not in a later step.
            if _first_launch(lambda: (kept(params), kept(params, carry=True))) is None:
                return None
            self._device = entry
        return kept

    def _param_addresses(self, params: Sequence[torch.Tensor]) -> np.ndarray | None:
        """The weights' addresses for the CPU kernels, or None. Weights at the addresses last
        checked (the same tensors: an optimizer steps in place) are not checked again: their
        dtype, device and size stay with their storage; the same array object is returned then.
        Compared as a list of ints (one C comparison; numpy's cost several calls, each ~10 us in
        a training step)."""
        if self._host_params is not None and _host_kernels() is not None:
            if list(map(torch.Tensor.data_ptr, params)) == self._host_list:
                return self._host_params
        self._host_params = _host_addresses(params, self.stacker.sizes)
        self._host_list = None if self._host_params is None else self._host_params.tolist()
        return self._host_params

    def pending(self, kept: torch.Tensor | np.ndarray, params: Sequence[torch.Tensor], carry: bool = False
                ) -> tuple[torch.Tensor | np.ndarray, Callable[[np.ndarray], np.ndarray] | None]:
        """The step's numbers (a device tensor, or the CPU kernels' ratios in a numpy array) and
        what finishes them on the host (None: nothing to do); valid until the next call.
        `carry`: keep the weights now for the next `before(params, reuse=True)`."""
        if isinstance(kept, np.ndarray):  # kept by the CPU kernels
            addresses = self._param_addresses(params)
            if addresses is None:  # the weights left the CPU or float32 during the step
                self._host_ratio[:] = math.nan
            else:
                _host_kernels().moved(addresses, self._host_sizes, kept, self._host_before, self._host_ratio, carry)
                self._carried = kept if carry else None
            return self._host_ratio, None
        if self._device is not None and kept is self._device[1]:  # kept by the device kernels
            self._carried = kept if carry else None
            return kept(params, carry), self._finish_device
        return self.norms(kept, params, carry), self.finish

    @staticmethod
    def _finish_device(squares: np.ndarray) -> np.ndarray:
        return _gpu_module().finish_update_ratio(squares)

    @torch.no_grad()
    def norms(self, kept: torch.Tensor, params: Sequence[torch.Tensor], carry: bool = False) -> torch.Tensor:
        """(2, k) ||before|| and ||after - before||, in grouped order; valid until the next call.
        The weights before are in row `_before_row` of `kept`, the weights after go to the other;
        `carry`: the difference overwrites the row before, and the row after is the next step's
        row before (no copy)."""
        before = self._before_row
        after = 1 - before
        self.stacker.stacks(params, dtype=torch.float64, row=after)
        if kept.device not in self._out:
            out = torch.zeros(2, len(self.stacker.sizes), dtype=torch.float64, device=kept.device)
            views = self.stacker.buffer(kept.device, torch.float64)[1]
            rows, start = [], 0
            for view in views:
                rows.append(out[:, start:start + view.shape[1]])
                start += view.shape[1]
            self._out[kept.device] = out, list(zip(views, rows, strict=True))
        out, pairs = self._out[kept.device]
        for view, rows in pairs:
            torch.linalg.vector_norm(view[before], dim=1, out=rows[0])  # padding is 0: adds nothing
        change = before if carry else after
        torch.sub(kept[after], kept[before], out=kept[change])
        for view, rows in pairs:
            torch.linalg.vector_norm(view[change], dim=1, out=rows[1])
        if carry:
            self._before_row, self._carried = after, kept
        return out

    def finish(self, norms: np.ndarray) -> np.ndarray:
        before, moved = np.asarray(norms, dtype=np.float64).reshape(2, -1)
        return ratio_from_norms(before, moved, np, self._order)

    @torch.no_grad()
    def __call__(self, kept: torch.Tensor | np.ndarray, params: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(kept, np.ndarray):
            return torch.from_numpy(self.pending(kept, params)[0].copy())
        if self._device is not None and kept is self._device[1]:
            squares, finish = self.pending(kept, params)
            return torch.from_numpy(finish(squares.cpu().numpy())).to(squares.device)
        before, moved = self.norms(kept, params)
        return ratio_from_norms(before, moved, torch,
                                None if self._order is None else torch.from_numpy(self._order).to(moved.device))


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
    _same_units(views)
    return torch.cat([v.transpose(0, 1).reshape(1, v.shape[1], -1) for v in views], dim=2)


def _same_units(views: Sequence) -> None:
    """Raises unless the views (tensors, or shapes) of a layer's calls have one number of units."""
    units = [(v if isinstance(v, tuple) else v.shape)[1] for v in views]
    if len(set(units)) > 1:
        raise ValueError(f"the calls of one layer have different numbers of units ({', '.join(map(str, units))}): "
                         "split them by width first (`by_units`)")


def by_units(calls: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """A module's calls in one step grouped by their number of units (dimension 1; a 1-d output's
    length), in the order each number first comes: calls of one width count as the same units,
    calls of another width are other units (a `self.relu` shared by layers of several widths).

    >>> [len(g) for g in by_units([torch.zeros(2, 8), torch.zeros(2, 16), torch.zeros(3, 8)])]
    [2, 1]
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for call in calls:
        groups.setdefault(call.shape[0] if call.dim() == 1 else call.shape[1], []).append(call)
    return list(groups.values())


def unit_shape(calls: torch.Tensor | Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The shape of `unit_view(calls)` without making it (a single tensor's own shape).

    >>> unit_shape([torch.zeros(4, 3, 5, 5), torch.zeros(2, 3, 5, 5)])
    (6, 3, 25)
    """
    if isinstance(calls, torch.Tensor):
        return tuple(calls.shape)
    views = [ActivationStats._view_shape(tuple(o.shape)) for o in calls]
    if len(views) == 1:
        return views[0]
    _same_units(views)
    if len({v[1:] for v in views}) == 1:
        return (sum(v[0] for v in views), *views[0][1:])
    return 1, views[0][1], sum(samples * positions for samples, _, positions in views)


def counts_calls_apart(device: torch.device) -> bool:
    """Whether a layer's several calls are counted each where it lies and their per-unit counts
    added (devices without the sign buffers: a GPU; the CPU when the device kernels read it),
    rather than concatenated into one tensor (`unit_view`) first, which the CPU's counts need."""
    return device.type not in SIGN_BUFFER_DEVICES or DEVICE_KERNELS_ON_CPU and DEVICE_KERNELS


def _nonzero_per_unit(output: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per unit, the outputs > 0 of a layer (NaN is not a firing), or of each of its calls added
    up: each output counted where it lies, through a boolean of its size freed at once, reduced
    over every dimension but the units' in its own memory layout (a channels-last output is not
    copied into `unit_view`'s layout)."""
    if not isinstance(output, torch.Tensor):
        counts = [_nonzero_per_unit(call, dtype) for call in output]
        return counts[0] if len(counts) == 1 else torch.stack(counts).sum(dim=0, dtype=dtype)
    fired = output > 0
    if output.dim() == 1:  # one sample: every value is a unit
        return fired.to(dtype)
    return fired.sum(dim=(0, *range(2, output.dim())), dtype=dtype)


def _first(outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor:
    return outputs[0] if isinstance(outputs[0], torch.Tensor) else outputs[0][0]


def _joined(outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> list:
    """`outputs` with each layer's several calls concatenated (`unit_view`) where the counts need
    one tensor (not `counts_calls_apart`), else as they are."""
    apart = counts_calls_apart(_first(outputs).device)
    return [o if isinstance(o, torch.Tensor) or apart else unit_view(o) for o in outputs]


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
        self._grouped_in_order = self._order == sorted(self._order)  # then the units are in order too
        grouped = [i for idx in self.groups for i in idx]
        self._totals = np.array([[self.units[i] for i in grouped], [math.prod(self.shapes[i]) for i in grouped]],
                                dtype=np.float64)  # (2, layers): units and outputs, grouped order
        self._on: dict = {}
        self._buffers: dict = {}
        self._out: dict = {}
        self._copies = 1  # shards in the global batch (distributed runs: `combine`)
        self.unit_total = sum(self.units)  # the length of `fired`
        # The CPU kernels' shapes, per-unit counts, rows (dead_fraction, zero_fraction) in layer
        # order, and epoch dead fractions.
        self._given = [torch.Size(s) for s in shapes]
        self._host_shapes = np.asarray(self.shapes, dtype=np.int64).reshape(-1, 3)
        self._host_units = np.asarray(self.units, dtype=np.int64)
        # int32 counts (twice the lanes of int64): a unit's outputs in a step are fewer than 2**31.
        self._host_per_unit = np.zeros(self.unit_total, dtype=np.int32)
        if min(self.units, default=0) == 0 or any(s * p >= 2**31 for s, _, p in self.shapes):
            self._given = []  # not for the kernels
        self._host_out = np.zeros(2 * len(self.shapes))
        self._host_epoch = np.zeros(len(self.shapes))
        mask = torch.zeros(self.unit_total, dtype=torch.bool)
        self._host_fired = mask, mask.numpy()  # the mask of an epoch that starts here, and its numpy view
        self._epoch_of: torch.Tensor | None = None
        # The device kernels' plans (`gpu.UnitCounts`) by the calls' layout (None: not for them),
        # the last one's key and plan, and the last `fired` they made with its epoch row.
        self._device_plans: dict = {}
        self._device_last: tuple = (None, None)
        self._device_fired: tuple = (None, None)
        self._layer_totals = np.array([self.units, [math.prod(s) for s in self.shapes]], dtype=np.float64)

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
                                torch.tensor(units, dtype=torch.int64, device=device),
                                torch.from_numpy(self._totals).to(device))
        return self._on[device]

    def _signs(self, group: list[torch.Tensor], number: int) -> torch.Tensor:
        """The signs of a group's outputs as (layers, samples, units[, positions]), in a buffer
        kept across steps (see `SizeGroups`)."""
        first = group[0]
        key = (number, first.device, first.dtype)
        kept = self._buffers.get(key)
        if kept is None or kept[0].shape[1:] != first.shape:
            buffer = torch.empty(len(group), *first.shape, dtype=first.dtype, device=first.device)
            samples, units, positions = self.shapes[self.groups[number][0]]
            view = buffer.view(len(group), samples, units, *([positions] if positions > 1 else []))
            kept = self._buffers[key] = buffer, buffer[0], view
        buffer, single, view = kept
        if len(group) == 1:
            torch.sign(first, out=single)
            return view
        try:
            torch.stack(group, out=buffer).sign_()
            return view
        except RuntimeError:  # the same units and positions, from outputs of other shapes
            return torch.stack([unit_view(t) for t in group]).sign_().view(view.shape)

    def _counts_buffer(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if device not in self._out:
            out = torch.zeros(2, len(self.shapes), dtype=torch.float64, device=device)
            starts = [0]
            for idx in self.groups:
                starts.append(starts[-1] + len(idx))
            self._out[device] = out, [out[:, a:b] for a, b in zip(starts, starts[1:], strict=False)]
        return self._out[device]

    def pending(self, outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]], combine: Callable | None = None,
                fired: torch.Tensor | None = None, checked: bool = False
                ) -> tuple[torch.Tensor | np.ndarray, Callable[[np.ndarray], np.ndarray] | None, torch.Tensor]:
        """(values, finish, fired): this step's numbers (a device tensor, or the CPU kernels'
        finished rows in a numpy array), what makes them the rows (dead_fraction, zero_fraction)
        flattened in layer order on the host (None: nothing to do), and the units that fired.
        `outputs` and `combine` as in `__call__`; `fired`: the units that fired earlier in the
        epoch (`unit_total` of them), included in the `fired` returned (on the CPU kernels' path
        OR-ed in place, when it is a CPU bool vector). `checked`: the outputs are tensors of the
        shapes this was made for, or where calls are counted apart (`counts_calls_apart`: a GPU) a
        layer's calls, of the `unit_shape` it was made for. The values are valid until the next call."""
        tensors = outputs if checked else _joined(outputs)
        apart = counts_calls_apart(_first(tensors).device)
        if apart and _device_kernels(_first(tensors)) is not None:
            made = self._device_pending(tensors, combine, fired)
            if made is not None:
                return made
        addresses = None if combine is not None or apart else _host_addresses(tensors, self._given, checked)
        if addresses is None:
            counts, now = self.counts(tensors, combine)
            return counts, self.finish, now if fired is None else fired.to(now.device) | now
        fresh = fired is None
        if fresh:  # a new epoch: this object's own mask, overwritten
            fired, view = self._host_fired
        elif fired is self._host_fired[0]:
            view = self._host_fired[1]
        else:
            if fired.dtype != torch.bool or not fired.is_cpu or fired.shape != (self.unit_total,):
                fired = fired.to("cpu", torch.bool).reshape(-1).clone()
            view = fired.numpy()
        _host_kernels().unit_counts(addresses, self._host_shapes, self._host_per_unit, view, fresh, self._host_out,
                                    self._host_epoch)
        self._epoch_of = fired  # `_host_epoch` holds its never-fired fractions
        return self._host_out, None, fired

    def _device_pending(self, outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]], combine: Callable | None,
                        fired: torch.Tensor | None) -> tuple | None:
        """`pending` through the device kernels (`gpu.UnitCounts`), or None where they do not
        read these outputs (a dtype they do not take, outputs on several devices or whose
        positions lie at no one stride, a layer without units or with 2**31 outputs a step)."""
        if all(map(torch.is_tensor, outputs)):
            calls, layer_of = outputs, None
        else:
            calls, layer_of = [], []
            for layer, output in enumerate(outputs):
                made = (output,) if isinstance(output, torch.Tensor) else output
                calls.extend(made)
                layer_of.extend([layer] * len(made))
        key = (tuple(map(_SHAPE, calls)), tuple(map(torch.Tensor.stride, calls)), tuple(map(_DTYPE_DEVICE, calls)),
               None if layer_of is None else tuple(layer_of))
        if key == self._device_last[0]:
            plan = self._device_last[1]
        else:
            plan = self._device_plans.get(key, False)
            if plan is False:
                plan = self._device_plans[key] = self._device_plan(calls, key, layer_of)
            self._device_last = key, plan
        if plan is None:
            return None
        device = plan.device
        if fired is not None and (fired.device != device or fired.dtype != torch.bool
                                  or fired.shape != (self.unit_total,) or not fired.is_contiguous()):
            if fired.numel() != self.unit_total:
                raise ValueError(f"fired: {fired.numel()} units, this layer set has {self.unit_total}")
            fired = fired.to(device, torch.bool).reshape(-1).contiguous()
        if combine is not None:
            def combine(per_unit, _combine=combine):
                total, self._copies = _combine(per_unit)
                return total, self._copies
        made = plan(calls, fired, combine) if plan.launched else _first_launch(self._first_run, plan, calls, fired,
                                                                               combine)
        if made is None:  # triton cannot build or launch its kernels here: torch operations from now on
            self._device_plans[key] = None
            self._device_last = key, None
            return None
        out, now = made
        self._device_fired = now, out[2]
        return out[:2], self._finish_layer_order, now

    @staticmethod
    def _first_run(plan, calls, fired, combine):
        made = plan(calls, fired, combine)
        plan.build_all()  # the other variants too: none is first built in the middle of a later step
        plan.launched = True
        return made

    def _device_plan(self, calls: Sequence[torch.Tensor], key: tuple, layer_of: list[int] | None):
        gpu = _device_kernels(calls[0])
        device = calls[0].device
        if gpu is None or any(d not in gpu.DTYPES or v != device for d, v in key[2]) or min(self.units) == 0:
            return None
        geometries = list(map(gpu.unit_geometry, calls))
        if None in geometries:
            return None
        layer_of = list(range(len(calls))) if layer_of is None else layer_of
        if len(calls) != len(layer_of) or max(layer_of) >= len(self.units):
            return None
        values = [0] * len(self.units)
        for (samples, units, others, *_), layer in zip(geometries, layer_of, strict=True):
            if units != self.units[layer]:  # not the outputs this was made for: torch operations say so
                return None
            values[layer] += samples * others
        if max(values) >= 2**31:  # a unit's outputs in a step, counted in int32
            return None
        return gpu.UnitCounts(geometries, [d for d, _ in key[2]], layer_of, self.units, device)

    def merged(self, rows: np.ndarray, parts: Sequence[int]) -> np.ndarray:
        """The rows (dead_fraction, zero_fraction) flattened, one per layer of this set, merged
        into one per module where `parts` (per module, its consecutive layers: the widths of a
        module called on several) joins several: dead units over all their units, zeros over all
        their outputs, from the integer counts (exact)."""
        totals = self._layer_totals.T * np.array([1.0, self._copies])  # (layers, 2): units, outputs
        counts = np.rint(np.asarray(rows, dtype=np.float64).reshape(-1, 2) * totals)
        starts = np.concatenate([[0], np.cumsum(parts)[:-1]]).astype(np.intp)
        return (np.add.reduceat(counts, starts, axis=0) / np.add.reduceat(totals, starts, axis=0)).reshape(-1)

    def merged_epoch(self, never: np.ndarray, parts: Sequence[int]) -> np.ndarray:
        """`epoch_dead_fraction`'s per-layer values merged as `merged` merges the rows."""
        units = self._layer_totals[0]
        starts = np.concatenate([[0], np.cumsum(parts)[:-1]]).astype(np.intp)
        never_units = np.rint(np.asarray(never, dtype=np.float64).reshape(-1) * units)
        return np.add.reduceat(never_units, starts) / np.add.reduceat(units, starts)

    def _finish_layer_order(self, counts: np.ndarray) -> np.ndarray:
        """The device kernels' (2, layers) in layer order on the host -> the rows (dead_fraction,
        zero_fraction) flattened."""
        totals = self._layer_totals if self._copies == 1 else self._layer_totals * np.array([[1.0], [self._copies]])
        with np.errstate(invalid="ignore"):  # a layer with no outputs this step (an empty batch): NaN, as torch's
            return ((totals - np.asarray(counts, dtype=np.float64).reshape(2, -1)) / totals).T.reshape(-1)

    @torch.no_grad()
    def counts(self, outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]],
               combine: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(2, layers) float64: the units that fired and the non-zero outputs of each layer, in
        grouped order (valid until the next call; `finish` makes the rows), and `fired`.

        `combine` (distributed runs) maps this process's per-unit non-zero counts (layers, units)
        to the global batch's, `(counts, copies)`: summed over the processes, whose `copies`
        shards make the global batch. A unit fired if it fired on any process."""
        tensors = _joined(outputs)
        device = _first(tensors).device
        unit_order = self._constants(device)[1]
        out, slots = self._counts_buffer(device)
        fired_parts = []
        for number, (idx, slot) in enumerate(zip(self.groups, slots, strict=True)):
            size = math.prod(self.shapes[idx[0]])
            if not counts_calls_apart(device):
                signs = self._signs([tensors[i] for i in idx], number)
                # ReLU outputs are >= 0: an output is non-zero iff its sign is 1 (NaN's sign is 0).
                # Per unit, the float sum of 0/1 values over samples and positions is an exact
                # integer count (see _count_dtype), 5-8x cheaper than a boolean count on a CPU; a
                # unit fired iff its count is > 0.
                per_unit = signs.sum(dim=1 if signs.dim() == 3 else (1, 3), dtype=_count_dtype(size))  # (L, U)
            else:
                # Elsewhere (a GPU) each output, and each call of a layer called several times, is
                # counted where it lies (`_nonzero_per_unit`): no buffer kept across steps the size
                # of every layer's output, and no concatenated copy of a layer's calls.
                dtype = _count_dtype(size)
                per_unit = torch.stack([_nonzero_per_unit(tensors[i], dtype) for i in idx])  # (L, U)
            if combine is not None:
                per_unit, self._copies = combine(per_unit)
            fired = per_unit > 0
            torch.sum(fired, dim=1, dtype=torch.float64, out=slot[0])
            torch.sum(per_unit, dim=1, dtype=torch.float64, out=slot[1])
            fired_parts.append(fired.reshape(-1))
        fired = torch.cat(fired_parts) if len(fired_parts) > 1 else fired_parts[0]
        return out, (fired if self._grouped_in_order else fired.index_select(0, unit_order))

    def finish(self, counts: np.ndarray) -> np.ndarray:
        """`counts` on the host -> the rows (dead_fraction, zero_fraction) flattened, layer order."""
        totals = self._totals if self._copies == 1 else self._totals * np.array([[1.0], [self._copies]])
        rows = ((totals - np.asarray(counts, dtype=np.float64).reshape(2, -1)) / totals).T
        return (rows if self._grouped_in_order else rows[np.asarray(self._order)]).reshape(-1)

    @torch.no_grad()
    def __call__(self, outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]],
                 combine: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`outputs`: per layer, its output, or the outputs of its calls in this step; `combine`
        as in `counts`."""
        values, finish, fired = self.pending(outputs, combine)
        if finish is None:  # the CPU kernels' rows
            return torch.from_numpy(values.reshape(-1, 2).copy()), fired
        if finish == self._finish_layer_order:  # the device kernels' counts, in layer order
            totals = torch.from_numpy(self._layer_totals * np.array([[1.0], [self._copies]])).to(values.device)
            return ((totals - values) / totals).t(), fired
        counts = values
        order, _, totals = self._constants(counts.device)
        if self._copies != 1:
            totals = torch.cat([totals[:1], totals[1:] * self._copies])
        rows = ((totals - counts) / totals).t()  # dead_fraction, zero_fraction
        return (rows if self._grouped_in_order else rows.index_select(0, order)), fired

    def epoch_pending(self, fired_in_epoch: torch.Tensor) -> torch.Tensor | np.ndarray:
        """`epoch_dead_fraction`, as a numpy array (valid until the next call) where the CPU
        kernels count a CPU bool vector."""
        if fired_in_epoch is self._epoch_of:  # the mask the last kernel call marked: counted there
            return self._host_epoch
        if fired_in_epoch is self._device_fired[0]:  # the device kernels' last mask: counted there
            return self._device_fired[1]
        if (fired_in_epoch.dtype == torch.bool and fired_in_epoch.is_cpu and self._given
                and fired_in_epoch.shape == (self.unit_total,) and _host_kernels() is not None):
            return _host_kernels().never_fired(fired_in_epoch.numpy(), self._host_units, self._host_epoch)
        flat = fired_in_epoch.reshape(-1)
        if len(set(self.units)) == 1:
            units = self.units[0]
            return (units - flat.reshape(-1, units).sum(dim=1)).double() / units
        never = [(u - part.sum()).double() / u for u, part in zip(self.units, flat.split(self.units), strict=True)]
        return torch.stack(never)

    def epoch_dead_fraction(self, fired_in_epoch: torch.Tensor) -> torch.Tensor:
        """Per layer, the share of units that never fired in the steps OR-ed into `fired_in_epoch`."""
        values = self.epoch_pending(fired_in_epoch)
        return torch.from_numpy(values.copy()) if isinstance(values, np.ndarray) else values


def activation_stats(outputs: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`ActivationStats` for one list of layer outputs (or of each layer's calls)."""
    return ActivationStats([unit_shape(o) for o in outputs])(outputs)
