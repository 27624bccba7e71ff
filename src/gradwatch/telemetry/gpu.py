"""Multi-tensor kernels (Triton) for the gradient statistics, the update ratio and the ReLU
counts on a GPU.

Each tensor is read where it lies, through a table of addresses and sizes, as torch's own
`_foreach_norm` does: a program takes one chunk (`CHUNK` values) of one tensor, so a step costs
one launch per dtype (float32, bf16, fp16, float64) and one launch that merges the chunks into
one row per tensor, whatever the number of tensors. Nothing is copied and nothing is read back:
the rows stay in a small float64 buffer on the device, which the caller transfers when it
likes (`stats.GradientStats.pending`).

Exact at every magnitude the dtypes hold: each value is widened to float64 in registers, so the
squares of float32, bf16 and fp16 values neither overflow nor underflow (float32 spans 1.4e-45
to 3.4e38, float64 normal numbers 2.2e-308 to 1.8e308). std stays right for a mean far larger
than the spread: each of a program's `BLOCK` lanes keeps the mean and centred sum of squares of
the values it reads (Welford's update, in float64 registers), and the lanes of a chunk, then the
chunks of a tensor, are merged with Chan et al.'s formula. Counts (zeros, NaN, inf) are
integers. The largest magnitude leaves NaN out, and the host makes it NaN when the tensor holds
one, as `torch.amax` does.

The update ratio keeps the weights before the step in their own dtype, in one flat buffer per
dtype (`UpdateNorms.keep`, one `_foreach_copy_`); after the step one kernel reads the weights
before and after and sums ||before||^2 and ||after - before||^2 per chunk in float64; with
`carry` it also writes the weights after into the buffer, which is then the next step's copy.

The ReLU layers' dead and zero fractions are counted the same way (`UnitCounts`): every
layer's output read where it lies, in its own layout, by one launch per dtype and layout and
one that finishes every layer.

Extra memory: the address tables and the partial sums of each chunk (8 float64 a chunk of
`CHUNK` values: 2.0e-3 bytes per gradient value), and the weights' copy for the update ratio.

On a CPU the same kernels run under Triton's interpreter (`TRITON_INTERPRET=1` set before
triton is imported), which is how the tests check them against float64 without a GPU.
"""

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from gradwatch.telemetry.stats import ratio_from_norms, rows_from_sums

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CUDA builds of torch ship triton; torch operations do the work then
    triton = None

BLOCK = 1024  # values a program holds in registers at a time
CHUNK = 32768  # values of one tensor a program reads: 32 blocks
MERGE_BLOCK = 256  # chunks the merge reads at a time
# The gradient kernel keeps six float64 and three int32 accumulators per lane: at 8 warps ptxas
# gives it 120 registers a thread and no spills on sm_90 (220 at 4 warps: half the threads resident).
GRADIENT_WARPS = 8
_GRADIENT_PARTS = 8  # per chunk: count, sum, centred sum of squares, sum of squares, zeros, NaN, inf, max |x|
GRADIENT_FIELDS = 7  # per tensor: mean, centred sum of squares, sum of squares, zeros, NaN, inf, max |x|
_CHANGE_PARTS = 2  # per chunk and per tensor: ||before||^2, ||after - before||^2


def interpreting() -> bool:
    """Whether triton runs its kernels in its interpreter, on CPU tensors (TRITON_INTERPRET=1
    when triton was imported)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def usable(tensor: torch.Tensor) -> bool:
    """Whether these kernels can read `tensor`: on CUDA, or on the CPU under the interpreter."""
    return triton is not None and (tensor.is_cuda or tensor.is_cpu and interpreting())


if triton is not None:
    DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}

    @triton.jit
    def _chunk(sizes, owner, first, CHUNK: tl.constexpr):
        """A chunk kernel's program, its tensor and the range [start, stop) of that tensor's
        values it reads. (A helper that both kernels inline: jitted at import, as triton resolves
        a kernel's calls to the jitted functions it finds by name.)"""
        program = tl.program_id(0)
        tensor = tl.load(owner + program)
        start = (program - tl.load(first + tensor)) * CHUNK
        return program, tensor, start, tl.minimum(start + CHUNK, tl.load(sizes + tensor))

    @triton.jit
    def _chunk_columns(bounds):
        """A merge kernel's program `t` and the columns [lo, hi) of its tensor's chunks."""
        t = tl.program_id(0)
        return t, tl.load(bounds + t), tl.load(bounds + t + 1)

    @triton.jit
    def _column(partials, field, stride, at, hi, other):
        """Row `field` of the chunks' partial sums at columns `at` (`other` at hi and past it)."""
        return tl.load(partials + field * stride + at, mask=at < hi, other=other)

    def _gradient_chunks(addresses, sizes, owner, first, partials, stride, base,
                         DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        """One chunk of one tensor: its count, sum, sum of squares about its mean, sum of
        squares, zeros, NaN, inf and largest finite magnitude, into column base + program.

        Each of the BLOCK lanes keeps its own sums over the values it loads, and its own mean
        and centred sum of squares (Welford's update), so the loop streams with no reduction
        across lanes; the lanes are merged once, at the end, by Chan et al.'s formula."""
        program, tensor, start, stop = _chunk(sizes, owner, first, CHUNK)
        x_at = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
        count = tl.zeros((BLOCK,), tl.float64)
        total = tl.zeros((BLOCK,), tl.float64)
        mean = tl.zeros((BLOCK,), tl.float64)
        centred = tl.zeros((BLOCK,), tl.float64)
        squares = tl.zeros((BLOCK,), tl.float64)
        zeros = tl.zeros((BLOCK,), tl.int32)
        nans = tl.zeros((BLOCK,), tl.int32)
        infs = tl.zeros((BLOCK,), tl.int32)
        top = tl.zeros((BLOCK,), tl.float64)
        for s in range(start, stop, BLOCK):
            offsets = s + tl.arange(0, BLOCK)
            valid = offsets < stop
            x = tl.load(x_at + offsets, mask=valid, other=0).to(tl.float64)
            # 1 / a lane's values so far, this one included: the same for every lane that loads
            # one, so one scalar division a block instead of a float64 division per value.
            inverse = 1.0 / ((s - start) // BLOCK + 1).to(tl.float64)
            count += valid.to(tl.float64)
            total += x
            deviation = x - mean
            mean += tl.where(valid, deviation * inverse, 0.0)
            centred += tl.where(valid, deviation * (x - mean), 0.0)
            squares += x * x
            magnitude = tl.abs(x)
            not_a_number = x != x
            zeros += (valid & (x == 0.0)).to(tl.int32)
            nans += not_a_number.to(tl.int32)
            infs += (magnitude == float("inf")).to(tl.int32)
            top = tl.maximum(top, tl.where(not_a_number, 0.0, magnitude))
        chunk_count = tl.sum(count, axis=0)
        chunk_total = tl.sum(total, axis=0)
        # The chunk's mean from its sum (an inf stays an inf); each lane's spread about it.
        spread = tl.where(count > 0, mean - chunk_total / chunk_count, 0.0)
        column = partials + base + program
        tl.store(column, chunk_count)
        tl.store(column + stride, chunk_total)
        tl.store(column + 2 * stride, tl.sum(centred + count * spread * spread, axis=0))
        tl.store(column + 3 * stride, tl.sum(squares, axis=0))
        tl.store(column + 4 * stride, tl.sum(zeros, axis=0).to(tl.float64))
        tl.store(column + 5 * stride, tl.sum(nans, axis=0).to(tl.float64))
        tl.store(column + 6 * stride, tl.sum(infs, axis=0).to(tl.float64))
        tl.store(column + 7 * stride, tl.max(top, axis=0))

    def _gradient_merge(partials, stride, bounds, rows, out, tensors, BLOCK: tl.constexpr):
        """One tensor's chunks (columns bounds[t] to bounds[t + 1]) merged into its row of `out`
        (GRADIENT_FIELDS, tensors), at its input position rows[t]."""
        t, lo, hi = _chunk_columns(bounds)
        count = tl.zeros((BLOCK,), tl.float64)
        total = tl.zeros((BLOCK,), tl.float64)
        squares = tl.zeros((BLOCK,), tl.float64)
        zeros = tl.zeros((BLOCK,), tl.float64)
        nans = tl.zeros((BLOCK,), tl.float64)
        infs = tl.zeros((BLOCK,), tl.float64)
        top = tl.zeros((BLOCK,), tl.float64)
        for s in range(lo, hi, BLOCK):
            at = s + tl.arange(0, BLOCK)
            count += _column(partials, 0, stride, at, hi, 0.0)
            total += _column(partials, 1, stride, at, hi, 0.0)
            squares += _column(partials, 3, stride, at, hi, 0.0)
            zeros += _column(partials, 4, stride, at, hi, 0.0)
            nans += _column(partials, 5, stride, at, hi, 0.0)
            infs += _column(partials, 6, stride, at, hi, 0.0)
            top = tl.maximum(top, _column(partials, 7, stride, at, hi, 0.0))
        n = tl.sum(count, axis=0)
        mean = tl.sum(total, axis=0) / n  # NaN for an empty tensor, as torch's mean
        # Chan et al. for all chunks at once: their own centred sums plus their means' spread.
        centred = tl.zeros((BLOCK,), tl.float64)
        for s in range(lo, hi, BLOCK):
            at = s + tl.arange(0, BLOCK)
            valid = at < hi
            size = _column(partials, 0, stride, at, hi, 1.0)
            delta = _column(partials, 1, stride, at, hi, 0.0) / size - mean
            own = _column(partials, 2, stride, at, hi, 0.0)
            centred += tl.where(valid, own + size * delta * delta, 0.0)
        row = out + tl.load(rows + t)
        tl.store(row, mean)
        tl.store(row + tensors, tl.sum(centred, axis=0))
        tl.store(row + 2 * tensors, tl.sum(squares, axis=0))
        tl.store(row + 3 * tensors, tl.sum(zeros, axis=0))
        tl.store(row + 4 * tensors, tl.sum(nans, axis=0))
        tl.store(row + 5 * tensors, tl.sum(infs, axis=0))
        tl.store(row + 6 * tensors, tl.max(top, axis=0))

    def _change_chunks(addresses, sizes, owner, first, partials, stride, base, kept, offsets,
                       CARRY: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        """One chunk of one weight tensor: ||before||^2 and ||after - before||^2 (float64), the
        weights before at kept[offsets[t]:], the weights after at addresses[t]; `CARRY`: the
        weights after written over the weights before."""
        program, tensor, start, stop = _chunk(sizes, owner, first, CHUNK)
        now_at = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
        was_at = kept + tl.load(offsets + tensor)
        before = tl.zeros((BLOCK,), tl.float64)
        change = tl.zeros((BLOCK,), tl.float64)
        for s in range(start, stop, BLOCK):
            at = s + tl.arange(0, BLOCK)
            valid = at < stop
            now = tl.load(now_at + at, mask=valid, other=0)
            was = tl.load(was_at + at, mask=valid, other=0).to(tl.float64)
            moved = now.to(tl.float64) - was  # exact: two float32 (or narrower) values in float64
            before += was * was
            change += moved * moved
            if CARRY:
                tl.store(was_at + at, now, mask=valid)
        column = partials + base + program
        tl.store(column, tl.sum(before, axis=0))
        tl.store(column + stride, tl.sum(change, axis=0))

    def _change_merge(partials, stride, bounds, rows, out, tensors, BLOCK: tl.constexpr):
        """One tensor's chunks summed into its column of `out` (2, tensors), at rows[t]."""
        t, lo, hi = _chunk_columns(bounds)
        before = tl.zeros((BLOCK,), tl.float64)
        change = tl.zeros((BLOCK,), tl.float64)
        for s in range(lo, hi, BLOCK):
            at = s + tl.arange(0, BLOCK)
            before += _column(partials, 0, stride, at, hi, 0.0)
            change += _column(partials, 1, stride, at, hi, 0.0)
        row = out + tl.load(rows + t)
        tl.store(row, tl.sum(before, axis=0))
        tl.store(row + tensors, tl.sum(change, axis=0))

    def _unit_counts(addresses, calls, programs, per_unit, UNITS_INNER: tl.constexpr, DTYPE: tl.constexpr,
                     BLOCK_U: tl.constexpr, BLOCK_O: tl.constexpr, STEPS: tl.constexpr):
        """One tile of one ReLU output: per unit of a block of BLOCK_U units, its values > 0 (NaN
        is not a firing) over up to BLOCK_O * STEPS of the output's other values (samples and
        positions), added to the unit's count in `per_unit` (int32, every layer's units).

        `programs` (programs, 4): each program's call, first unit, sample and first other value;
        `calls` (calls, 6): each call's units, other values a sample, the strides of its sample,
        unit and other values, and where its layer's units start in `per_unit`. `UNITS_INNER`:
        the units are the closer values in memory (a (batch, features) output, channels-last),
        else the other values are (a (batch, channels, height, width) output): the tile is laid
        out so that its last axis runs along memory."""
        row = programs + 4 * tl.program_id(0)
        call = tl.load(row)
        unit = tl.load(row + 1) + tl.arange(0, BLOCK_U)
        meta = calls + 6 * call
        units = tl.load(meta)
        others = tl.load(meta + 1)
        x_at = tl.load(addresses + call).to(tl.pointer_type(DTYPE)) + tl.load(row + 2) * tl.load(meta + 2)
        unit_stride = tl.load(meta + 3)
        other_stride = tl.load(meta + 4)
        start = tl.load(row + 3)
        stop = tl.minimum(start + BLOCK_O * STEPS, others)
        in_layer = unit < units
        if UNITS_INNER:
            fired = tl.zeros((BLOCK_O, BLOCK_U), tl.int32)
            for s in range(start, stop, BLOCK_O):
                other = s + tl.arange(0, BLOCK_O)
                valid = (other[:, None] < stop) & in_layer[None, :]
                x = tl.load(x_at + other[:, None] * other_stride + unit[None, :] * unit_stride, mask=valid, other=0)
                fired += (x > 0).to(tl.int32)  # in its own dtype: a float64 1e-300 fired
            counts = tl.sum(fired, axis=0)
        else:
            fired = tl.zeros((BLOCK_U, BLOCK_O), tl.int32)
            for s in range(start, stop, BLOCK_O):
                other = s + tl.arange(0, BLOCK_O)
                valid = in_layer[:, None] & (other[None, :] < stop)
                x = tl.load(x_at + unit[:, None] * unit_stride + other[None, :] * other_stride, mask=valid, other=0)
                fired += (x > 0).to(tl.int32)  # in its own dtype: a float64 1e-300 fired
            counts = tl.sum(fired, axis=1)
        tl.atomic_add(per_unit + tl.load(meta + 5) + unit, counts, mask=in_layer)

    def _unit_finish(counts, per_unit, layers, earlier, fired, out, n_layers, EARLIER: tl.constexpr,
                     BLOCK: tl.constexpr):
        """One layer's per-unit counts (its units at layers[2l], layers[2l + 1] of them) -> in
        `out` (3, layers): the units that fired, the outputs > 0, and the share of units that
        fired in none of the epoch's steps so far (`earlier`, when EARLIER, or-ed in); `fired`
        gets the units that fired in the epoch (uint8); `per_unit` is left zero for the next step."""
        layer = tl.program_id(0)
        first = tl.load(layers + 2 * layer)
        units = tl.load(layers + 2 * layer + 1)
        now = tl.zeros((BLOCK,), tl.int64)
        outputs = tl.zeros((BLOCK,), tl.int64)
        epoch = tl.zeros((BLOCK,), tl.int64)
        for s in range(0, units, BLOCK):
            at = first + s + tl.arange(0, BLOCK)
            valid = s + tl.arange(0, BLOCK) < units
            count = tl.load(counts + at, mask=valid, other=0).to(tl.int64)  # int32, or float64 summed over processes
            fired_now = count > 0
            now += fired_now.to(tl.int64)
            outputs += count
            if EARLIER:
                fired_now = fired_now | (tl.load(earlier + at, mask=valid, other=0) != 0)
            epoch += fired_now.to(tl.int64)
            tl.store(fired + at, fired_now.to(tl.uint8), mask=valid)
            tl.store(per_unit + at, tl.zeros((BLOCK,), tl.int32), mask=valid)
        total = units.to(tl.float64)
        tl.store(out + layer, tl.sum(now, axis=0).to(tl.float64))
        tl.store(out + n_layers + layer, tl.sum(outputs, axis=0).to(tl.float64))
        tl.store(out + 2 * n_layers + layer, (total - tl.sum(epoch, axis=0).to(tl.float64)) / total)
else:  # pragma: no cover
    DTYPES = {}

_made: dict = {}


def _kernel(function):
    """`function` as a triton kernel, made once: compiled for the GPU, or interpreted when
    TRITON_INTERPRET=1 was set before triton was imported (triton decides then, for its own
    helpers too)."""
    kernel = _made.get(function)
    if kernel is None:
        kernel = _made[function] = triton.jit(function)
    return kernel


class _Layout:
    """Tensors of given sizes and dtypes laid out for the kernels on one device, made once: per
    dtype, the tensors' sizes, each program's tensor, each tensor's first program; for the
    merge, each tensor's range of chunks and its input position; the address tables, uploaded
    again only when an address changes."""

    def __init__(self, sizes: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device, chunk: int):
        self.device = device
        by_dtype: dict = {}
        for i, dtype in enumerate(dtypes):
            by_dtype.setdefault(dtype, []).append(i)
        self.groups = []  # (dtype, input indices, sizes, owner, first, programs, base)
        bounds, rows, base = [0], [], 0
        for dtype, members in by_dtype.items():
            chunks = [-(-sizes[i] // chunk) for i in members]  # ceil: an empty tensor has none
            owner = np.repeat(np.arange(len(members), dtype=np.int32), chunks)
            first = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)
            self.groups.append((dtype, members, _on(np.asarray([sizes[i] for i in members], dtype=np.int64), device),
                                _on(owner, device), _on(first, device), int(sum(chunks)), base))
            for i, c in zip(members, chunks, strict=True):
                bounds.append(bounds[-1] + c)
                rows.append(i)
            base += int(sum(chunks))
        self.chunks = base
        self.bounds = _on(np.asarray(bounds, dtype=np.int64), device)
        self.rows = _on(np.asarray(rows, dtype=np.int64), device)
        self.addresses = _AddressTables([members for _, members, *_ in self.groups], device)


def _on(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A table made on the host, on `device` (once per layout)."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(device)


class _AddressTables:
    """Per group of indices into a list of tensors, the tensors' addresses in an int64 table on
    the device, uploaded again only when an address changes. A new table goes up from pinned
    memory without blocking the host (the host allocator keeps that memory until the copy is
    done); an optimizer keeps its weights, and the caching allocator usually gives a step's
    gradients and activations the addresses of the last step's, so this is rare after the
    first step."""

    def __init__(self, groups: Sequence[Sequence[int]], device: torch.device):
        self.groups, self.device = [list(members) for members in groups], device
        self.uploaded: list[int] | None = None
        self.tables: list[torch.Tensor] = []

    def at_last(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether `tensors` lie where the tables say (the usual step: ~9 us for 150 tensors)."""
        return list(map(torch.Tensor.data_ptr, tensors)) == self.uploaded

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per group, the tensors' addresses on the device."""
        now = list(map(torch.Tensor.data_ptr, tensors))
        if now != self.uploaded:
            tables = []
            for members in self.groups:
                table = torch.tensor([now[i] for i in members], dtype=torch.int64)
                if self.device.type == "cuda":
                    table = table.pin_memory().to(self.device, non_blocking=True)
                tables.append(table)
            self.tables, self.uploaded = tables, now
        return self.tables


def _current(device: torch.device):
    """A context in which `device` is CUDA's current device: triton launches on the current
    device (and its current stream), whatever device the tables' addresses belong to."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _readable(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors, each contiguous (a copy of the rare one that is not: the kernels read
    `numel` values from its address)."""
    if all(map(torch.Tensor.is_contiguous, tensors)):
        return tensors
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


class _MultiTensor:
    """What `GradientSums` and `UpdateNorms` share: their tensors' layout, the partial sums of
    each chunk (`parts` a chunk, float64), the (fields, tensors) float64 output, and a step's
    launches: one of `chunks` per dtype, then one of `merge` for all the tensors."""

    def __init__(self, sizes: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device, block: int,
                 chunk: int, warps: int, parts: int, fields: int, chunks, merge):
        self.sizes = list(sizes)
        self.block, self.chunk, self.warps = block, chunk, warps
        self.layout = _Layout(self.sizes, dtypes, device, chunk)
        self.partials = torch.zeros(parts, max(self.layout.chunks, 1), dtype=torch.float64, device=device)
        self.out = torch.zeros(fields, len(self.sizes), dtype=torch.float64, device=device)
        self._chunks, self._merge = _kernel(chunks), _kernel(merge)
        self._extra = [()] * len(self.layout.groups)  # per dtype, the chunk kernel's own arguments

    def _launch(self, tensors: Sequence[torch.Tensor], placed: bool, **constants) -> torch.Tensor:
        """The kernels over `tensors` (`placed`: found at the tables' addresses); `constants`:
        the chunk kernel's own, beside its dtype and layout."""
        readable = _readable(tensors)
        layout, partials = self.layout, self.partials
        tables = layout.addresses.tables if placed and readable is tensors else layout.addresses(readable)
        stride = partials.shape[1]
        with _current(layout.device):
            for (dtype, _, sizes, owner, first, programs, base), table, extra in zip(layout.groups, tables,
                                                                                   self._extra, strict=True):
                if programs:
                    self._chunks[(programs,)](table, sizes, owner, first, partials, stride, base, *extra,
                                              DTYPE=DTYPES[dtype], BLOCK=self.block, CHUNK=self.chunk,
                                              num_warps=self.warps, **constants)
            self._merge[(len(self.sizes),)](partials, stride, layout.bounds, layout.rows, self.out, len(self.sizes),
                                            BLOCK=MERGE_BLOCK)
        return self.out


class GradientSums(_MultiTensor):
    """Per tensor, the raw sums `finish_gradient_rows` makes the statistics of, as a (7,
    tensors) float64 buffer on the device, in input order (valid until the next call)."""

    def __init__(self, sizes: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device,
                 block: int = BLOCK, chunk: int = CHUNK, warps: int = GRADIENT_WARPS):
        super().__init__(sizes, dtypes, device, block, chunk, warps, _GRADIENT_PARTS, GRADIENT_FIELDS,
                         _gradient_chunks, _gradient_merge)

    def __call__(self, grads: Sequence[torch.Tensor], placed: bool = False) -> torch.Tensor:
        """`placed`: the caller found the gradients at the tables' addresses (`addresses.at_last`)."""
        return self._launch(grads, placed)


def finish_gradient_rows(raw: np.ndarray, n: np.ndarray) -> np.ndarray:
    """`GradientSums`' (7, tensors) on the host and the tensors' sizes -> the rows (mean, std,
    zero_fraction, norm, abs_max, nonfinite) flattened, then the global norm (float64)."""
    mean, centred, squares, zeros, nans, infs, top = np.asarray(raw, dtype=np.float64).reshape(GRADIENT_FIELDS, -1)
    if nans.any():  # the kernels leave NaN out of the largest magnitude
        top = np.where(nans > 0, np.nan, top)
    # An empty tensor's rows are NaN (0/0): numpy's warnings off only then (errstate costs a few us).
    quiet = contextlib.nullcontext() if n.all() else np.errstate(divide="ignore", invalid="ignore")
    with quiet:
        table, global_norm = rows_from_sums(n, mean, centred, squares, zeros, nans + infs, top, np)
    flat = np.empty(table.size + 1)
    flat[:-1] = table.reshape(-1)
    flat[-1] = global_norm
    return flat


class UpdateNorms(_MultiTensor):
    """The weights before a step kept in their own dtype (one flat buffer per dtype), and per
    tensor ||before||^2 and ||after - before||^2 as a (2, tensors) float64 buffer on the device,
    in input order."""

    def __init__(self, sizes: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device,
                 block: int = BLOCK, chunk: int = CHUNK, warps: int = 4):
        super().__init__(sizes, dtypes, device, block, chunk, warps, _CHANGE_PARTS, _CHANGE_PARTS,
                         _change_chunks, _change_merge)
        self.kept, self.offsets, self.views = [], [], [None] * len(self.sizes)
        for dtype, members, *_ in self.layout.groups:
            flat = torch.empty(sum(self.sizes[i] for i in members), dtype=dtype, device=device)
            starts = np.concatenate([[0], np.cumsum([self.sizes[i] for i in members])[:-1]]).astype(np.int64)
            for i, start in zip(members, starts.tolist(), strict=True):
                self.views[i] = flat[start:start + self.sizes[i]]
            self.kept.append(flat)
            self.offsets.append(_on(starts, device))
        self._extra = list(zip(self.kept, self.offsets, strict=True))

    @torch.no_grad()
    def keep(self, params: Sequence[torch.Tensor]) -> "UpdateNorms":
        """The weights now copied into the flat buffers (one multi-tensor copy); returns self."""
        try:
            torch._foreach_copy_(self.views, params)
        except RuntimeError:  # the first call, or weights of other shapes: views of their shapes
            self.views = [v.view(p.shape) for v, p in zip(self.views, params, strict=True)]
            torch._foreach_copy_(self.views, params)
        return self

    def __call__(self, params: Sequence[torch.Tensor], carry: bool = False) -> torch.Tensor:
        # An optimizer steps its weights in place: the tables hold their addresses after the first step.
        return self._launch(params, self.layout.addresses.at_last(params), CARRY=carry)


def finish_update_ratio(squares: np.ndarray) -> np.ndarray:
    """`UpdateNorms`' (2, tensors) on the host -> ||after - before|| / ||before|| per tensor (0
    where nothing moved, inf where weights that were all 0 moved)."""
    before, change = np.asarray(squares, dtype=np.float64).reshape(_CHANGE_PARTS, -1)
    return ratio_from_norms(np.sqrt(before), np.sqrt(change), np)


UNIT_BLOCK = 32  # units a tile holds
OTHER_BLOCK = 32  # other values (samples, positions) of each unit a tile holds
OTHER_STEPS = 32  # tiles a program reads: up to 1024 values of each of its units
FINISH_BLOCK = 1024  # units the finishing kernel reads at a time


def unit_geometry(output: torch.Tensor) -> tuple[int, int, int, int, int, int] | None:
    """A ReLU output as the kernels read it: (samples, units, others, sample stride, unit
    stride, other stride), its values at sample * sample stride + unit * unit stride + other *
    other stride (in elements) for each sample, unit and other value, the samples and positions
    folded into the other values where one stride steps through both (a (batch, features)
    output, a channels-last one); None when its positions do not lie at one stride from each
    other (a view the kernels cannot address: torch operations count it). Dimension 1 holds the
    units (`stats.unit_view`); a 1-d output is one sample.

    >>> unit_geometry(torch.zeros(8, 4, 3, 3))
    (8, 4, 9, 36, 9, 1)
    >>> unit_geometry(torch.zeros(8, 4, 3, 3).to(memory_format=torch.channels_last))
    (1, 4, 72, 0, 1, 4)
    """
    shape, strides = output.shape, output.stride()
    if len(shape) == 1:
        return 1, shape[0], 1, 0, strides[0], 0
    samples, units = shape[0], shape[1]
    positions, position_stride = 1, 1
    for size, stride in zip(reversed(shape[2:]), reversed(strides[2:]), strict=True):
        if size == 1:
            continue
        if positions == 1:
            positions, position_stride = size, stride
        elif stride == position_stride * positions:
            positions *= size
        else:
            return None
    if positions == 1:  # the samples are the other values
        return 1, units, samples, 0, strides[1], strides[0]
    if samples == 1 or strides[0] == position_stride * positions:
        return 1, units, samples * positions, 0, strides[1], position_stride
    return samples, units, positions, strides[0], strides[1], position_stride


class UnitCounts:
    """Per ReLU layer, the units that fired and the outputs > 0 in a step, counted where the
    outputs lie by two kinds of launch whatever the number of layers: one of `_unit_counts` per
    dtype and layout (units or other values closer in memory) present, adding each unit's count
    into an int32 vector of every layer's units, and one of `_unit_finish` for all the layers.
    Made once per set of output shapes, strides and dtypes (`geometries`); a layer called
    several times in a step has each call counted and the counts added.

    Extra memory: the per-unit counts (4 bytes a unit), the tables (O(calls + tiles)), and each
    step's `fired` (1 byte a unit); no copy of any output."""

    def __init__(self, geometries: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype], layer_of: Sequence[int],
                 units: Sequence[int], device: torch.device):
        self.device = device
        starts = np.concatenate([[0], np.cumsum(units)[:-1]]).astype(np.int64)
        by_kind: dict = {}
        for i, (geometry, dtype) in enumerate(zip(geometries, dtypes, strict=True)):
            _, _, _, _, unit_stride, other_stride = geometry
            inner = abs(unit_stride) <= abs(other_stride) if other_stride else True
            by_kind.setdefault((dtype, inner), []).append(i)
        self.groups = []  # (dtype, units inner, call indices, calls table, programs table, programs)
        for (dtype, inner), members in by_kind.items():
            meta, tiles = [], []
            for local, i in enumerate(members):
                samples, n_units, others, sample_stride, unit_stride, other_stride = geometries[i]
                meta.append((n_units, others, sample_stride, unit_stride, other_stride, starts[layer_of[i]]))
                grid = np.stack(np.meshgrid(np.arange(0, n_units, UNIT_BLOCK), np.arange(samples),
                                            np.arange(0, others, OTHER_BLOCK * OTHER_STEPS), indexing="ij"), -1)
                grid = grid.reshape(-1, 3)
                tiles.append(np.column_stack([np.full(len(grid), local), grid]))
            table = np.concatenate(tiles).astype(np.int64) if tiles else np.zeros((0, 4), np.int64)
            self.groups.append((dtype, inner, members, _on(np.asarray(meta, dtype=np.int64), device),
                                _on(table, device), len(table)))
        self.layers = _on(np.column_stack([starts, np.asarray(units, dtype=np.int64)]), device)
        self.per_unit = torch.zeros(int(sum(units)), dtype=torch.int32, device=device)
        self.out = torch.zeros(3, len(units), dtype=torch.float64, device=device)
        self._addresses = _AddressTables([members for _, _, members, *_ in self.groups], device)
        self._count, self._finish = _kernel(_unit_counts), _kernel(_unit_finish)
        self.launched = False  # set by the caller once a launch went through (the kernels are built)
        self._counts_dtype = torch.int32  # what the finishing kernel last read: int32, float64 with `combine`

    def __call__(self, calls: Sequence[torch.Tensor], earlier: torch.Tensor | None = None,
                 combine=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, fired): `out` (3, layers) float64 on the device, in layer order: the units that
        fired, the outputs > 0, and the share of units that fired in no step of the epoch (valid
        until the next call); `fired` (bool, every layer's units) the units that fired in this
        step or `earlier` (the epoch's mask so far). `calls` in the order of `geometries`.
        `combine` (distributed runs) maps the per-unit counts to the global batch's (float64)."""
        tables = self._addresses(calls)
        fired = torch.empty(self.per_unit.shape, dtype=torch.uint8, device=self.device)
        with _current(self.device):
            for (dtype, inner, _, meta, table, programs), addresses in zip(self.groups, tables, strict=True):
                if programs:
                    self._count[(programs,)](addresses, meta, table, self.per_unit, UNITS_INNER=inner,
                                             DTYPE=DTYPES[dtype], BLOCK_U=UNIT_BLOCK, BLOCK_O=OTHER_BLOCK,
                                             STEPS=OTHER_STEPS)
            counts = self.per_unit
            if combine is not None:  # float64: summed over the processes, a count may pass 2**31
                counts = combine(self.per_unit)[0]
            self._counts_dtype = counts.dtype
            has_earlier = earlier is not None
            earlier = earlier.view(torch.uint8) if has_earlier else fired
            layers = self.out.shape[1]
            self._finish[(layers,)](counts, self.per_unit, self.layers, earlier, fired, self.out, layers,
                                    EARLIER=has_earlier, BLOCK=FINISH_BLOCK)
        return self.out, fired.view(torch.bool)

    def build_all(self) -> None:
        """Builds the finishing kernel's variant a call has not built yet (with and without an
        epoch's mask so far) on one unit of scratch memory, so that a later step does not build
        it (an error there would come in the middle of a step, past the fallback)."""
        counts = torch.zeros(1, dtype=self._counts_dtype, device=self.device)
        mask = torch.zeros(1, dtype=torch.uint8, device=self.device)
        layers = torch.tensor([[0, 1]], dtype=torch.int64).to(self.device)
        out = torch.zeros(3, 1, dtype=torch.float64, device=self.device)
        with _current(self.device):
            for earlier in (False, True):
                self._finish[(1,)](counts, torch.zeros(1, dtype=torch.int32, device=self.device), layers, mask,
                                   mask.clone(), out, 1, EARLIER=earlier, BLOCK=FINISH_BLOCK)
