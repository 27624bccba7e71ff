"""Train a network with gradient telemetry: `python train.py model=mlp optimizer.lr=0.01`.

Sweeps: `python train.py -m optimizer.lr=0.001,0.01,0.1 seed=0,1,2`. See README.md.

This file owns what the user sees of a run: one `gradwatch:` line (the verdict with its evidence,
the final loss and the `tensorboard --logdir` command for the run folder) and the exit code (0 done,
1 failed, 2 refused, 130/143 interrupted). In a sweep each run gets its progress line from the
sweep callback instead. A refused command leaves an existing run folder byte-identical.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gradwatch.config.cli import precheck, precheck_resume, run_folder
from gradwatch.storage.paths import RunPaths

CONF_DIR = Path(__file__).parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from gradwatch.config.checks import check_config
    from gradwatch.config.errors import ConfigError

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:
        # Every scalar key checked before torch and Lightning load: a typo is refused at once.
        # (In a sweep the pipeline records the refusal in the run's run.json and the sweep goes on.)
        try:
            check_config(cfg)
        except ConfigError as err:
            _record_refusal(cfg, str(err))
            _refused(str(err))

    from gradwatch.summary import sweep
    from gradwatch.telemetry.distributed import is_rank_zero
    from gradwatch.training.pipeline import EXIT_REFUSED, RunFailed, exit_code, run

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
        sys.exit(code)
    if not multirun and is_rank_zero():
        print(sweep.last_line(result.record, result.run_dir), flush=True)
    if result.exit_code:
        sys.exit(result.exit_code)
    return result.value


def _record_refusal(cfg: DictConfig, message: str) -> None:
    """A new run folder records why it holds no run (an existing run's record is left as it was)."""
    from gradwatch.storage.record import RunRecord

    hydra_cfg = HydraConfig.get()
    record = RunRecord(hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task), cfg.get("seed"))
    if not record.path.exists():
        record.write(status="failed", error=message)


def _refused(message: str) -> None:
    print(f"gradwatch: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    argv = sys.argv[1:]
    precheck(argv, conf_dir=CONF_DIR)
    folder = run_folder(argv)
    snapshot = RunPaths(folder).snapshot() if folder is not None and RunPaths(folder).is_run() else None
    problem = precheck_resume(argv, folder, conf_dir=CONF_DIR)
    if problem:
        _refused(problem)
    try:
        main()
    except SystemExit as done:
        if snapshot is not None and done.code == 2:
            snapshot.restore()  # Hydra wrote .hydra/ before the run was refused: put it back
        raise
