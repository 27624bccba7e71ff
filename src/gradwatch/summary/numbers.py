"""How a number is shown, the one way for a number that is missing or not finite.

A missing, NaN or infinite number is written `nan` on the console, in Markdown and in CSV,
`null` in run.json (strict JSON has no NaN) and NaN in TensorBoard's HParams tab. Why it is
missing is said once, by the run's status and verdict (`diverged`, `failed`), never by the
number's spelling.

    >>> format_number(0.0123456), format_number(None), format_number(float("inf")), format_number(3)
    ('0.01235', 'nan', 'nan', '3')
    >>> to_csv(pd.DataFrame({"loss": [0.5, float("inf"), None]}))
    'loss\\n0.5\\nnan\\nnan\\n'
"""

import math
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd

MISSING = "nan"


def is_finite(value: Any) -> bool:
    """Whether `value` is a real, finite number (a bool is not a number here)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, spec: str = ".4g") -> str:
    """`value` formatted with `spec`, or `MISSING` when it is missing or not finite."""
    return format(value, spec) if is_finite(value) else MISSING


def finite_or_none(value: Any) -> float | None:
    """run.json's spelling: the number, or None (null) when it is missing or not finite."""
    return value if is_finite(value) else None


def finite_or_nan(value: Any) -> float:
    """HParams' spelling: the number as a float, or NaN when it is missing or not finite."""
    return float(value) if is_finite(value) else math.nan


def finite_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every infinite number made NaN (so that tables write it as `MISSING`)."""
    numeric = frame.select_dtypes(include="number").columns
    if not len(numeric):
        return frame
    out = frame.copy()
    out[numeric] = out[numeric].replace([np.inf, -np.inf], np.nan)
    return out


def to_csv(frame: pd.DataFrame) -> str:
    """The CSV text of `frame` (no index), missing and non-finite numbers as `MISSING`."""
    return finite_frame(frame).to_csv(index=False, na_rep=MISSING)


def to_markdown(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A Markdown table of `frame` (no index), missing and non-finite numbers as `MISSING`."""
    return finite_frame(frame).to_markdown(index=False, floatfmt=floatfmt, missingval=MISSING)
