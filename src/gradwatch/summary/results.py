"""A run's results, read once from its parquet parts: outcome, findings and the curves the report draws.

The run's end (`training/pipeline.py`) and the summary (`summary/table.py`) both call
`read_results`, with the same thresholds, so run.json, summary.csv and summary.md always agree.

    >>> results = read_results(run_dir, Thresholds.of_run(run_dir))   # doctest: +SKIP
    >>> results.verdict, results.outcome.final_loss                    # doctest: +SKIP
    ('converged', 2.1e-07)
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gradwatch.summary import findings as fx
from gradwatch.summary.outcome import Outcome, outcome_of, outcome_tag


def result_tag(tag: str) -> bool:
    """The tags the outcome, the findings and the report read (one pass over the parquet)."""
    return fx.diagnosis_tag(tag) or outcome_tag(tag)


@dataclass
class RunResults:
    outcome: Outcome
    findings: list[fx.Finding]
    curves: fx.Curves  # every tag `result_tag` keeps, sorted once (the report's input too)
    unreadable: list[str]  # parquet parts that could not be read

    @property
    def verdict(self) -> str:
        return fx.verdict(self.findings)

    @property
    def codes(self) -> str:
        return fx.codes(self.findings)

    def record(self) -> dict:
        """run.json's `verdict` and `findings`."""
        return {"verdict": self.verdict, "findings": [f.as_dict() for f in self.findings]}


def read_results(run_dir: Path, thresholds: fx.Thresholds, units: Mapping[str, int] | None = None) -> RunResults:
    """Outcome and findings of the run folder's parquet parts, both with `thresholds`'
    convergence threshold; `units` (layer -> width) only adds counts to the details."""
    from gradwatch.storage.parquet import read_scalars

    scalars = read_scalars(run_dir, keep=result_tag)
    outcome = outcome_of(scalars, thresholds.converge_below, thresholds.converge_relative)
    curves = fx.Curves(scalars.frame())
    found = fx.diagnose(curves, thresholds, units=units)
    return RunResults(outcome, found, curves, scalars.unreadable)
