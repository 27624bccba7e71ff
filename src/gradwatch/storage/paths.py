"""The run folder's layout: the one place its file and folder names are spelled.

    >>> paths = RunPaths("outputs/run")
    >>> str(paths.last_ckpt), str(paths.tb)
    ('outputs/run/checkpoints/last.ckpt', 'outputs/run/tb')
"""

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


def tensorboard_command(logdir: Path | str) -> str:
    """The command that opens `logdir` in TensorBoard, by the full path of the `tensorboard` installed
    beside this Python (the venv's), so that it works without activating the venv.

        >>> tensorboard_command("outputs/run 1").endswith("tensorboard --logdir 'outputs/run 1'")
        True
    """
    beside = Path(sys.executable).absolute().parent / "tensorboard"
    program = str(beside) if beside.exists() else shutil.which("tensorboard") or "tensorboard"
    return f"{shlex.quote(program)} --logdir {shlex.quote(str(logdir))}"


# A summarised folder's files (a sweep's, or one run's with scripts/summarize.py).
SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
REPORT_PNG, HEATMAP_PNG, SCATTER_PNG, DEAD_PNG, GRADIENTS_PNG = (
    "report.png", "report_heatmap.png", "report_scatter.png", "report_dead.png", "report_gradients.png")
# A sweep's per-setting TensorBoard runs: the mean over seeds, one folder per setting.
MEAN_OVER_SEEDS = "mean_over_seeds"


@dataclass(frozen=True)
class RunPaths:
    """`<root>/run.json`, `.hydra/`, `tb/`, `metrics/`, `checkpoints/last.ckpt`, `error.log`."""

    root: Path

    def __init__(self, root: Path | str):
        object.__setattr__(self, "root", Path(root))

    RECORD = "run.json"
    HYDRA = ".hydra"
    TB = "tb"
    METRICS = "metrics"
    CHECKPOINTS = "checkpoints"
    LAST = "last.ckpt"
    ERROR_LOG = "error.log"

    @property
    def record(self) -> Path:
        return self.root / self.RECORD

    @property
    def hydra(self) -> Path:
        return self.root / self.HYDRA

    @property
    def config(self) -> Path:
        """The resolved config Hydra saved."""
        return self.hydra / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.hydra / "overrides.yaml"

    @property
    def hydra_config(self) -> Path:
        """Hydra's own node, with `runtime.choices` (the group options picked)."""
        return self.hydra / "hydra.yaml"

    @property
    def tb(self) -> Path:
        return self.root / self.TB

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def error_log(self) -> Path:
        return self.root / self.ERROR_LOG

    def snapshot(self) -> "Snapshot":
        """The files a command that is then refused may have changed: run.json, the top-level
        logs and `.hydra/` (never metrics, tb or checkpoints: nothing writes them before the checks)."""
        return Snapshot.take(self)

    def is_run(self) -> bool:
        """Whether anything of a run is here (a record, metrics or Hydra's files)."""
        return self.record.exists() or self.metrics.is_dir() or self.hydra.is_dir()


class Snapshot:
    """The bytes of a run folder's small files, to put back after a refused command.

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> _ = (root / "run.json").write_text("{}"); snap = RunPaths(root).snapshot()
    >>> _ = (root / "run.json").write_text("[]"); (root / ".hydra").mkdir(); _ = (root / ".hydra" / "x").write_text("")
    >>> snap.restore(); (root / "run.json").read_text(), (root / ".hydra").exists()
    ('{}', False)
    """

    def __init__(self, paths: RunPaths, files: dict[Path, bytes], had_hydra: bool):
        self.paths, self.files, self.had_hydra = paths, files, had_hydra

    @classmethod
    def take(cls, paths: RunPaths) -> "Snapshot":
        files = {p: p.read_bytes() for p in cls._watched(paths)}
        return cls(paths, files, paths.hydra.is_dir())

    @staticmethod
    def _watched(paths: RunPaths) -> list[Path]:
        if not paths.root.is_dir():
            return []
        top = [p for p in paths.root.iterdir() if p.is_file()]
        hydra = [p for p in paths.hydra.rglob("*") if p.is_file()] if paths.hydra.is_dir() else []
        return top + hydra

    def restore(self) -> None:
        """Put every watched file back as it was, and remove those the command added."""
        for path in self._watched(self.paths):
            if path not in self.files:
                path.unlink()
        for path, data in self.files.items():
            if not path.exists() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        if not self.had_hydra and self.paths.hydra.is_dir():
            for folder in sorted((p for p in self.paths.hydra.rglob("*") if p.is_dir()), reverse=True):
                folder.rmdir()
            self.paths.hydra.rmdir()
