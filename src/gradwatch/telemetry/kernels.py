"""Fused CPU kernels for the statistics: one pass over each tensor where torch needs a dozen.

On a CPU the statistics are memory-bound: each torch operation reads (and often writes) the whole
gradient, and a step's telemetry took ~15 such passes plus a copy of every gradient into one
stack. These kernels (numba, compiled on first use and cached on disk) read each float32 tensor
where it lies, through its address, and keep every sum in float64 registers: the gradients'
rows take one pass from memory (each chunk of 2048 values is then read three times from L1: its
largest magnitude and zeros, its sum, its sum of squares about its mean; the chunks are merged
by Chan et al.'s update), the update ratio one pass after the step (when every step logs, that
pass also keeps the weights for the next; otherwise a copy before the step), the dead units one
pass over the ReLU outputs
(`scripts/bench_telemetry.py` measures them against the torch path).

Exact at any float32 magnitude, like the torch path: a float32 value squared in float64 neither
overflows nor underflows (float32 spans 1.4e-45 to 3.4e38; float64 normal numbers 2.2e-308 to
1.8e308), and the difference of two float32 numbers is exact in float64. Counts are integers.
The largest magnitude comes from the values' bit patterns (sign cleared), whose integer order
is the order of the magnitudes, NaN above inf: an integer maximum that vectorises and gives NaN
for a row holding one, as torch's `amax` does. `reassoc` lets the compiler reorder the sums (and
so vectorise them); NaN and inf keep their meaning (no `nnan`/`ninf`).

The entry points (`gradient_rows`, `keep`, `moved`, `unit_counts`, `never_fired`) are the
compiled functions themselves, each called once a step: a Python wrapper around each was one more
frame a call. `available()` says whether numba imports; the callers (`stats.py`) fall back to torch operations
without it, and for any tensor that is not a contiguous float32 CPU tensor (CUDA, bf16, float64).
"""

import math

import numpy as np

try:
    import numba
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; torch operations do the work then
    numba = None

_FLAGS = {"reassoc", "contract"}
_MAGNITUDE = np.int32(0x7FFFFFFF)  # all bits but the sign
_INFINITY = np.int32(0x7F800000)  # the bit pattern of +inf; NaNs lie above it
_CHUNK = 2048  # values a gradient's variance takes in two passes while they sit in L1 (8 KiB)


def available() -> bool:
    return numba is not None


if numba is not None:

    @intrinsic
    def _pointer(typingctx, address):
        """An integer address (`tensor.data_ptr()`) as a `void*`, for `numba.carray`."""
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(address), codegen

    def _kernel(function):
        return numba.njit(fastmath=_FLAGS, cache=True, nogil=True, error_model="numpy")(function)

    # Each loop over a tensor is a function of its own: inside the loop over tensors the
    # compiler left the same loops unvectorised (measured 3-6x slower).
    @_kernel
    def _float32_at(address, n):
        return numba.carray(_pointer(address), (n,), np.float32)

    # Each pass over a chunk is a loop of its own, on values in L1: fused into one loop with float64
    # and integer lanes side by side, the compiler vectorised none of it (measured 4x slower).
    # Integer operations are cast back to int32 at once: numba widens them to int64, which halves
    # the lanes (measured 3.7x slower for the largest magnitude).
    @_kernel
    def _chunk_top_zeros(x):
        """The largest magnitude's bits and the zeros of a chunk (a float32 count: exact below 2**24)."""
        bits = x.view(np.int32)
        top = np.int32(0)
        zeros = np.float32(0)
        for i in range(x.shape[0]):
            magnitude = np.int32(bits[i] & _MAGNITUDE)
            top = max(top, magnitude)
            zeros += np.float32(1) if magnitude == np.int32(0) else np.float32(0)
        return top, zeros

    @_kernel
    def _chunk_sum(x):
        total = 0.0
        for i in range(x.shape[0]):
            total += np.float64(x[i])
        return total

    @_kernel
    def _chunk_centred(x, mean):
        centred = 0.0
        for i in range(x.shape[0]):
            deviation = np.float64(x[i]) - mean
            centred += deviation * deviation
        return centred

    @_kernel
    def _nonfinite_squares(x):
        """The non-finite values and the sum of squares: for a row holding inf or NaN."""
        bits = x.view(np.int32)
        nonfinite = 0
        squares = 0.0
        for i in range(x.shape[0]):
            nonfinite += np.int32(bits[i] & _MAGNITUDE) >= _INFINITY
            value = np.float64(x[i])
            squares += value * value
        return nonfinite, squares

    @_kernel
    def _row_sums(address, n):
        """sum, sum of squares (float64), the sum of squares about the mean (for the variance),
        the largest magnitude's bits, zeros and non-finite values; each chunk of the tensor read
        from memory once, then from L1."""
        x = _float32_at(address, n)
        total = 0.0
        top = np.int32(0)
        zeros = 0
        mean = 0.0  # of the chunks so far
        centred = 0.0  # their sum of squares about it
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            chunk = x[start:stop]
            chunk_top, chunk_zeros = _chunk_top_zeros(chunk)
            top = max(top, chunk_top)
            zeros += np.int64(chunk_zeros)
            chunk_total = _chunk_sum(chunk)
            size = stop - start
            chunk_mean = chunk_total / size
            chunk_centred = _chunk_centred(chunk, chunk_mean)  # two-pass variance of the chunk
            # Chan et al.'s update: the chunk merged into the chunks before it.
            delta = chunk_mean - mean
            mean += delta * size / stop
            centred += chunk_centred + delta * delta * start * size / stop
            total += chunk_total
        if top >= _INFINITY:  # inf or NaN in the row (rare): count them, and sum the squares as they are
            nonfinite, squares = _nonfinite_squares(x)
        else:
            # sum x**2 = sum (x - mean)**2 + n * mean**2: two terms >= 0, so no cancellation.
            nonfinite, squares = 0, centred + total * total / n
        return total, squares, centred, top, zeros, nonfinite

    @_kernel
    def gradient_rows(addresses, sizes, tops, out):
        """`GradientStats`' rows of float32 CPU tensors, by address (`tensor.data_ptr()`; the
        caller keeps the tensors alive): out[6 * r : 6 * r + 6] = mean, std, zero_fraction, norm,
        abs_max, nonfinite of the tensor at addresses[r] (float64); out[-1] = the global norm.
        `tops` (int32 scratch, one per row) holds the largest magnitudes' bit patterns."""
        everything = 0.0
        magnitudes = tops.view(np.float32)
        for r in range(addresses.shape[0]):
            n = sizes[r]
            total, squares, centred, top, zeros, nonfinite = _row_sums(addresses[r], n)
            tops[r] = top
            row = out[6 * r : 6 * r + 6]
            row[0] = total / n
            row[1] = math.sqrt(centred / (n - 1)) if n > 1 else 0.0
            row[2] = zeros / n
            # The square root may round below the largest magnitude: keep norm >= abs_max exact.
            row[3] = max(math.sqrt(squares), np.float64(magnitudes[r]))
            row[4] = magnitudes[r]
            row[5] = nonfinite
            everything += squares
        out[-1] = math.sqrt(everything)

    @_kernel
    def _copy_squares(address, kept):
        x = _float32_at(address, kept.shape[0])
        squares = 0.0
        for i in range(kept.shape[0]):
            value = x[i]
            kept[i] = value
            squares += np.float64(value) * np.float64(value)
        return squares

    @_kernel
    def keep(addresses, sizes, kept, before):
        """`UpdateRatio.before`: copies the float32 tensors into `kept` (float32, end to end) and
        puts each one's squared norm in `before` (float64)."""
        start = 0
        for r in range(addresses.shape[0]):
            before[r] = _copy_squares(addresses[r], kept[start : start + sizes[r]])
            start += sizes[r]

    @_kernel
    def _change_squares(address, kept):
        x = _float32_at(address, kept.shape[0])
        squares = 0.0
        for i in range(kept.shape[0]):
            change = np.float64(x[i]) - np.float64(kept[i])  # exact: float32 values in float64
            squares += change * change
        return squares

    @_kernel
    def _change_squares_keep(address, kept):
        """The same, and the tensor copied into `kept` with its squared norm: kept for the next step."""
        x = _float32_at(address, kept.shape[0])
        squares = 0.0
        now = 0.0
        for i in range(kept.shape[0]):
            value = x[i]
            change = np.float64(value) - np.float64(kept[i])
            squares += change * change
            now += np.float64(value) * np.float64(value)
            kept[i] = value
        return squares, now

    @_kernel
    def moved(addresses, sizes, kept, before, out, carry):
        """`UpdateRatio`: out[r] = ||now - kept|| / ||kept|| for each tensor (float64; 0 if it did
        not move, inf if it was all 0 and moved); `carry`: then `kept` and `before` hold the
        tensors now, as `keep` would (one pass over the weights where two were)."""
        start = 0
        for r in range(addresses.shape[0]):
            if carry:
                squares, now = _change_squares_keep(addresses[r], kept[start : start + sizes[r]])
            else:
                squares, now = _change_squares(addresses[r], kept[start : start + sizes[r]]), before[r]
            out[r] = 0.0 if squares == 0.0 else math.sqrt(squares) / math.sqrt(before[r])
            before[r] = now
            start += sizes[r]

    @_kernel
    def _count_rows(x, samples, units, counts):
        """counts[u] += outputs > 0 of unit u, for (samples, units) outputs: along the units, four
        samples at a time (one load and store of the counts for four rows: 10-30% faster)."""
        s = 0
        while s + 4 <= samples:
            a = x[s * units : (s + 1) * units]
            b = x[(s + 1) * units : (s + 2) * units]
            c = x[(s + 2) * units : (s + 3) * units]
            d = x[(s + 3) * units : (s + 4) * units]
            for u in range(units):  # int32 lanes: twice as many per instruction as int64
                counts[u] = np.int32(counts[u] + np.int32(a[u] > 0) + np.int32(b[u] > 0) + np.int32(c[u] > 0)
                                     + np.int32(d[u] > 0))
            s += 4
        while s < samples:
            row = x[s * units : (s + 1) * units]
            for u in range(units):
                counts[u] = np.int32(counts[u] + np.int32(row[u] > 0))
            s += 1

    @_kernel
    def _count_blocks(x, samples, units, positions, counts):
        """The same for (samples, channels, positions): a sum over each channel's positions."""
        for s in range(samples):
            for u in range(units):
                block = x[(s * units + u) * positions : (s * units + u + 1) * positions]
                fired = np.int32(0)
                for p in range(positions):
                    fired = np.int32(fired + np.int32(block[p] > 0))
                counts[u] += fired

    @_kernel
    def unit_counts(addresses, shapes, per_unit, fired, fresh, out, never):
        """`ActivationStats`. For each float32 layer output at addresses[l], of shape (samples,
        units, positions) = shapes[l]: per_unit[...] (int32 scratch, the layers' units end to
        end) = how many of each unit's outputs are > 0; fired[...] (bool) = that count > 0
        (`fresh`: the first step of an epoch), or |= it (the units that fired so far in the
        epoch); out[2 * l], out[2 * l + 1] = the layer's dead fraction (units that did not fire)
        and zero fraction (outputs that are 0); never[l] = the share of its units that never
        fired in the epoch so far. A ReLU's output is >= 0 or NaN: > 0 is non-zero, and NaN
        counts as not firing."""
        start = 0
        for layer in range(addresses.shape[0]):
            samples, units, positions = shapes[layer, 0], shapes[layer, 1], shapes[layer, 2]
            x = _float32_at(addresses[layer], samples * units * positions)
            counts = per_unit[start : start + units]
            counts[:] = 0
            if positions == 1:
                _count_rows(x, samples, units, counts)
            else:
                _count_blocks(x, samples, units, positions, counts)
            fired_units = 0
            nonzero = 0
            fired_in_epoch = 0
            for u in range(units):
                count = counts[u]
                fired_units += count > 0
                nonzero += count
                now = (count > 0) if fresh else (fired[start + u] or count > 0)
                fired[start + u] = now
                fired_in_epoch += now
            outputs = samples * units * positions
            out[2 * layer] = (units - fired_units) / units
            out[2 * layer + 1] = (outputs - nonzero) / outputs
            never[layer] = (units - fired_in_epoch) / units
            start += units

    @_kernel
    def never_fired(fired, units, out):
        """`ActivationStats.epoch_dead_fraction`: out[l] (float64) = the share of layer l's units
        (units[l] of them, int64, end to end in `fired`, bool) that `fired` does not mark."""
        start = 0
        for layer in range(units.shape[0]):
            never = 0
            for u in range(start, start + units[layer]):
                never += not fired[u]
            out[layer] = never / units[layer]
            start += units[layer]
        return out
