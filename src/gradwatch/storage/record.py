"""`run.json`: a run's status and results, written at start and rewritten atomically at the end.

Strict JSON: a non-finite number is written as null (the status says why, e.g. `diverged`).
"""

import json
import time
from pathlib import Path
from typing import Any

from gradwatch.storage.files import write_json_atomic
from gradwatch.storage.paths import RunPaths

STATUSES = ("running", "completed", "diverged", "interrupted", "failed")


class RunRecord:
    """The run's record; every change is written to `<run_dir>/run.json` at once."""

    def __init__(self, run_dir: Path, overrides: list[str], seed: Any, enabled: bool = True):
        self.path = RunPaths(run_dir).record
        self.enabled = enabled  # False in a distributed run's processes but rank 0
        self.data: dict[str, Any] = {
            "status": "running",
            "steps": 0,
            "final_loss": None,
            "min_loss": None,
            "steps_to_converge": None,
            "overrides": list(overrides),
            "seed": seed,
            "wall_s": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "error": None,
        }

    def write(self, **fields: Any) -> None:
        self.data.update(fields)
        if self.enabled:
            write_json_atomic(self.path, self.data)


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run's record. Raises OSError when it cannot be read and ValueError when it is not a JSON
    object (a truncated file, a list, NaN written by an older version is accepted)."""
    record = json.loads(RunPaths(run_dir).record.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"a JSON object was expected, not {type(record).__name__}")
    return record
