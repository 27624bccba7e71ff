"""Convergence and run-outcome math over loss curves (plain Python/NumPy, tested alone)."""

import math
from collections.abc import Sequence

import numpy as np


def converge_threshold(initial_loss: float, converge_below: float, relative: bool) -> float:
    return converge_below * initial_loss if relative else converge_below


def steps_to_converge(steps: Sequence[int], losses: Sequence[float], converge_below: float,
                      relative: bool = False) -> int | None:
    """The first step whose loss is at or below the threshold, or None.

    >>> steps_to_converge([0, 1, 2], [4.0, 0.5, 0.1], 0.5)
    1
    >>> steps_to_converge([0, 1, 2], [4.0, 0.5, 0.1], 0.05, relative=True)
    2
    """
    if len(losses) == 0:
        return None
    values = np.asarray(losses, dtype=np.float64)
    threshold = converge_threshold(float(values[0]), converge_below, relative)
    hits = np.flatnonzero(values <= threshold)
    return int(np.asarray(steps)[hits[0]]) if len(hits) else None


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
