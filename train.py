"""Train a network with gradient telemetry: `python train.py model=mlp optimizer.lr=0.01`.

Sweeps: `python train.py -m optimizer.lr=0.001,0.01,0.1 seed=0,1,2`. `python train.py --help` lists
the groups and keys. See README.md.

This file owns what the user sees of a run: one `gradwatch:` line (the verdict with its evidence,
the final loss, the accuracy and dead ReLU units where there are any), then a `TensorBoard:` line
with the command that opens the run folder, and the exit code (0 done, 1 failed, 2 refused, 130/143
interrupted). In a sweep each run gets its progress line from the sweep callback instead.

A refused command (exit 2) leaves no new run folder and an existing one byte-identical: what can be
checked from the command line is checked before Hydra starts; what only the built objects can tell
(a shape, a Trainer option) removes the folder Hydra made for it.
"""

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gradwatch.config.cli import CONF_DIR, PRIMARY, precheck, precheck_resume, refuse, run_folder
from gradwatch.storage.paths import RunPaths

# Set by the command line below: whether a refused single run removes the folder Hydra made for it
# (it did not exist before), and whether Hydra named that folder (its date folder may go too).
_NEW_FOLDER = {"remove": False, "named_by_hydra": False}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=PRIMARY)
def main(cfg: DictConfig) -> float:
    from gradwatch.config.errors import ConfigError
    from gradwatch.summary import sweep
    from gradwatch.summary.findings import in_words
    from gradwatch.telemetry.distributed import is_rank_zero
    from gradwatch.training.pipeline import EXIT_REFUSED, RunFailed, exit_code, run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run(cfg)
    except (ConfigError, RunFailed) as err:
        code = exit_code(err)
        if multirun and code in (EXIT_REFUSED, 1):
            return float("nan")  # recorded; the sweep callback prints the run's line and goes on
        if multirun:
            sweep.report_run(HydraConfig.get(), getattr(err, "record", {}))  # the sweep stops here
        elif is_rank_zero():
            print(f"gradwatch: {err}", file=sys.stderr, flush=True)
        if not multirun and code == EXIT_REFUSED and _NEW_FOLDER["remove"]:
            _remove_new_folder(Path(HydraConfig.get().runtime.output_dir), _NEW_FOLDER["named_by_hydra"])
        sys.exit(code)
    if not multirun and is_rank_zero():
        print(f"gradwatch: {in_words(result.record)}\nTensorBoard: {_open_command(result.run_dir)}", flush=True)
    if result.exit_code:
        sys.exit(result.exit_code)
    return result.value


def _open_command(run_dir: Path) -> str:
    """The command that opens the run folder, shown relative to the working directory when under it."""
    from gradwatch.storage.paths import tensorboard_command
    from gradwatch.summary.sweep import shown_path

    return tensorboard_command(shown_path(run_dir))


def _remove_new_folder(folder: Path, named_by_hydra: bool) -> None:
    """A single run refused after Hydra made its folder: the folder goes, and the date folder Hydra
    named it under when that is empty now."""
    shutil.rmtree(folder, ignore_errors=True)
    if named_by_hydra:
        try:
            folder.parent.rmdir()
        except OSError:
            pass  # not empty: other runs of the day


if __name__ == "__main__":
    argv = sys.argv[1:]
    precheck(argv)
    folder = run_folder(argv)
    _NEW_FOLDER.update(remove=folder is None or not folder.exists(), named_by_hydra=folder is None)
    snapshot = RunPaths(folder).snapshot() if folder is not None and RunPaths(folder).is_run() else None
    problem = precheck_resume(argv, folder)
    if problem:
        refuse(problem)
    try:
        main()
    except SystemExit as done:
        if done.code == 2 and snapshot is not None:
            snapshot.restore()  # Hydra wrote .hydra/ before the run was refused: put it back
        raise
