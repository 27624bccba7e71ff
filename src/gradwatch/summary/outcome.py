"""A run's outcome: one dataclass, computed in one place from the run's recorded scalars.

`run.json` (at the end of a run), the summary table's columns and the HParams tab's metrics all
come from `Outcome`, computed by `outcome_of` from the same parquet parts, so they always agree.
The curve is this run folder's: a run started from another run's checkpoint reports on the steps
logged here (a resume in the same folder has all of them).

"The end of the run" is the median (or, for accuracy, the mean) over the last tenth of the logged
steps, at least 3 (`end_window`), so that one noisy batch does not decide a verdict.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from gradwatch.summary.numbers import finite_or_nan, finite_or_none
from gradwatch.telemetry import tags

# The share of the logged steps that stands for "the end" (or "the middle") of a curve.
END_SHARE = 0.1


# Field metadata: which fields the HParams tab shows as metrics.
_HPARAM = {"hparam": True}


@dataclass
class Outcome:
    """What a run reached. Field names are the column names of the summary and the keys of run.json;
    a value the run has no data for is None (NaN in the summary table)."""

    steps: int = 0
    final_loss: float | None = field(default=None, metadata=_HPARAM)
    min_loss: float | None = field(default=None, metadata=_HPARAM)
    steps_to_converge: int | None = field(default=None, metadata=_HPARAM)
    converged: bool = False
    diverged: bool = False
    dead_fraction_final: float | None = field(default=None, metadata=_HPARAM)
    dead_fraction_max: float | None = None
    grad_global_norm_final: float | None = None
    # Classification: the batch accuracy, averaged over the end of the run (`end_window`).
    accuracy_final: float | None = field(default=None, metadata=_HPARAM)
    # `dead_fraction_final/<layer>` and `dead_fraction_max/<layer>` for each ReLU layer.
    layers: dict[str, float] = field(default_factory=dict)

    @classmethod
    def names(cls) -> list[str]:
        """The scalar fields, in column order (`layers` go after `dead_fraction_max`)."""
        return [f.name for f in fields(cls) if f.name != "layers"]

    @classmethod
    def hparam_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata.get("hparam")]

    def row(self) -> dict:
        """The summary table's columns: missing and non-finite values as NaN-able floats."""
        row = asdict(self)
        layers = row.pop("layers")
        row = {k: math.nan if v is None else v for k, v in row.items()}
        return {**row, **layers}

    def record(self) -> dict:
        """run.json's fields: strict JSON, so a non-finite number is null (the status says why);
        `dead_fraction_layers` holds each ReLU layer's final dead fraction (the worst one shows)."""
        row = asdict(self)
        layers = row.pop("layers")
        row = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
        prefix = "dead_fraction_final/"
        row["dead_fraction_layers"] = {k.removeprefix(prefix): finite_or_none(v) for k, v in layers.items()
                                       if k.startswith(prefix)}
        return row

    def hparams_metrics(self) -> dict[str, float]:
        """The HParams tab's metrics: NaN for what is missing or not finite."""
        return {name: finite_or_nan(getattr(self, name)) for name in self.hparam_names()}

    @property
    def value(self) -> float:
        """What Hydra's sweepers minimise: the final loss; a diverged run is infinitely bad, not missing."""
        final = finite_or_none(self.final_loss)
        return math.inf if final is None else final


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


def end_window(n: int) -> int:
    """How many of `n` logged steps make "the end" of a run: a tenth, at least 3 (all when fewer)."""
    return min(n, max(3, math.ceil(n * END_SHARE)))


def loss_at_end(losses: Sequence[float]) -> float | None:
    """The median loss over the end of the run (`end_window`), or None without a loss.

    >>> loss_at_end([4.0, 0.0009, 0.2, 0.3, 0.25])
    0.25
    """
    values = np.asarray(losses, dtype=np.float64)
    return float(np.median(values[-end_window(len(values)):])) if len(values) else None


def ended_below(losses: Sequence[float], converge_below: float, relative: bool = False) -> bool:
    """Whether the loss ended at or below the threshold (`loss_at_end`), not only touched it once.

    >>> ended_below([4.0, 0.0009, 0.2, 0.3, 0.25], 0.001), ended_below([4.0, 0.1, 1e-4, 2e-4, 1e-4], 0.001)
    (False, True)
    """
    end = loss_at_end(losses)
    if end is None:
        return False
    return end <= converge_threshold(float(losses[0]), converge_below, relative)


def outcome_tag(tag: str) -> bool:
    """The tags an outcome is computed from (read only these from parquet)."""
    return (tag in (tags.LOSS, tags.ACCURACY, tags.GLOBAL_NORM) or tags.is_dead_fraction(tag)
            or _is_nonfinite_count(tag))


def _is_nonfinite_count(tag: str) -> bool:
    return tags.is_grad_stat(tag, "nonfinite")


def outcome_of(scalars, converge_below: float, relative: bool = False) -> Outcome:
    """The outcome of a run from its scalars (`gradwatch.storage.parquet.Scalars`).

    `diverged`: a non-finite loss or a non-finite gradient count above 0 was recorded.
    `converged`: not diverged, and the loss ended at or below the threshold (`ended_below`);
    `steps_to_converge` is the first step it was there, whether or not it stayed.
    """
    steps, losses = scalars.series(tags.LOSS)
    finite = losses[np.isfinite(losses)]
    nonfinite_grads = scalars.value[scalars.mask(_is_nonfinite_count)]
    _, norm = scalars.series(tags.GLOBAL_NORM)
    _, accuracy = scalars.series(tags.ACCURACY)
    stc = steps_to_converge(steps, losses, converge_below, relative)
    diverged = len(finite) < len(losses) or bool((nonfinite_grads > 0).any())
    return Outcome(
        steps=int(steps[-1]) + 1 if len(steps) else 0,
        final_loss=float(losses[-1]) if len(losses) else None,
        min_loss=float(finite.min()) if len(finite) else None,
        steps_to_converge=stc,
        converged=not diverged and ended_below(losses, converge_below, relative),
        diverged=diverged,
        grad_global_norm_final=float(norm[-1]) if len(norm) else None,
        accuracy_final=float(np.mean(accuracy[-end_window(len(accuracy)):])) if len(accuracy) else None,
        **_dead_fractions(scalars),
    )


def _dead_fractions(scalars) -> dict:
    rows = scalars.mask(tags.is_dead_fraction)
    if not rows.any():
        return {}
    steps, codes, values = scalars.step[rows], scalars.code[rows], scalars.value[rows]
    _, index = np.unique(steps, return_inverse=True)
    mean = np.bincount(index, weights=values) / np.bincount(index)  # over layers, per logged step
    layers = {}
    for code in sorted(set(codes.tolist()), key=lambda c: natural_key(scalars.names[c])):
        layer = tags.layer_of(scalars.names[code])
        mine = codes == code
        layers[f"dead_fraction_final/{layer}"] = float(values[mine][np.argmax(steps[mine])])
        layers[f"dead_fraction_max/{layer}"] = float(values[mine].max())
    return {"dead_fraction_final": float(mean[-1]), "dead_fraction_max": float(mean.max()), "layers": layers}


def natural_key(text: str) -> list:
    """Sort key putting `act/2/...` before `act/10/...`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
