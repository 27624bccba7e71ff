"""`run.json`: a run's status and results, written at start and rewritten atomically at the end."""

import json
import time
from pathlib import Path
from typing import Any

from gradwatch.storage.files import write_json_atomic

RUN_FILE = "run.json"


class RunRecord:
    """The run's record; every change is written to `<run_dir>/run.json` at once."""

    def __init__(self, run_dir: Path, overrides: list[str], seed: Any):
        self.path = Path(run_dir) / RUN_FILE
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
        write_json_atomic(self.path, self.data)


def read_run(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN_FILE).read_text())
