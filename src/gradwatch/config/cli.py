"""Checks of the command line that must happen before Hydra starts: one clear line, no traceback."""

import os
import sys
from pathlib import Path

# The repository's conf/ folder: the one place it is located.
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def _parsed(argv: list[str]) -> list:
    """The overrides among `argv` that Hydra's parser reads (flags and what it refuses are Hydra's to report)."""
    from gradwatch.config.overrides import parse

    found = []
    for arg in argv:
        try:
            found += parse([arg])
        except Exception:  # noqa: BLE001 - Hydra reports text it cannot parse, with its own message
            continue
    return found


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The error for the first `group=option` naming an option that does not exist, else None.

    >>> check_group_choices(["model=mlpp"])
    'model=mlpp is not valid: allowed is one of linear, mlp'
    """
    for override in _parsed(argv):
        key = override.key_or_group
        if override.is_delete() or "." in key or not (conf_dir / key).is_dir():
            continue
        try:
            choices = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        except Exception:  # noqa: BLE001 - sweep functions Hydra expands itself (range, glob) are its to check
            continue
        options = group_options(key, conf_dir)
        for choice in choices:
            if choice is None or choice == "":
                continue
            if choice not in options:
                return f"{key}={choice} is not valid: allowed is one of {', '.join(options)}"
    return None


def check_output_folder(argv: list[str]) -> str | None:
    """The error when the run or sweep folder cannot be created and written, else None."""
    # The folder this command writes to: the sweep folder with -m, else the run folder; both
    # default to outputs/ (conf/train.yaml).
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(argv) else "hydra.run.dir"
    folders = {key: "outputs"}
    for arg in argv:
        typed, _, value = arg.lstrip("+").partition("=")
        if typed == key:
            folders[key] = value
    for key, folder in folders.items():
        if "${" in folder:
            continue  # interpolated: Hydra resolves it
        existing = Path(folder).absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return (f"{key}={folder} is not valid: allowed is a folder that can be created and written "
                    f"({existing} is not a writable folder)")
    return None


def precheck(argv: list[str] | None = None, conf_dir: Path = CONF_DIR) -> None:
    argv = sys.argv[1:] if argv is None else argv
    message = check_group_choices(argv, conf_dir) or check_output_folder(argv)
    if message:
        print(f"gradwatch: {message}", file=sys.stderr)
        sys.exit(2)


def _multirun(argv: list[str]) -> bool:
    return bool({"-m", "--multirun"} & set(argv))


def _typed(argv: list[str], key: str) -> str | None:
    """The last value typed for `key` (`key=v`, `+key=v`, `++key=v`), as Hydra reads it (quotes
    removed: Lightning's DDP launcher quotes the run folder it passes to its processes), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value, parser = None, OverridesParser.create()
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra reports text it cannot parse, with its own message
            continue
        if override.key_or_group == key and not override.is_delete():
            found = override.value()
            value = None if found is None else str(found)
    return value


def run_folder(argv: list[str]) -> Path | None:
    """The run folder a single run writes to when the command names it (`hydra.run.dir=...`), else None."""
    folder = _typed(argv, "hydra.run.dir")
    if _multirun(argv) or folder is None or "${" in folder:
        return None
    return Path(folder)


def precheck_resume(argv: list[str], folder: Path | None, conf_dir: Path = CONF_DIR) -> str | None:
    """The error for a `ckpt_path` that cannot resume this config, else None: the file exists (`last`:
    in the run folder), loads with `weights_only=True`, and its weights have the names and shapes of
    the configured model. Builds the model from the composed config; writes nothing."""
    value = _typed(argv, "ckpt_path")
    if _multirun(argv) or value in (None, "", "null") or (value == "last" and folder is None):
        return None  # `last` in a folder Hydra names: the run reports it, naming the folder
    from hydra import compose, initialize_config_dir

    from gradwatch.config.errors import ConfigError
    from gradwatch.training.checkpointing import check_fits, read_checkpoint, resolve_ckpt_path

    try:
        path = resolve_ckpt_path(value, folder or Path.cwd())
        checkpoint = read_checkpoint(path, value)
        overrides = [o.input_line for o in _parsed(argv)]
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        from gradwatch.config.build import build

        check_fits(checkpoint, build(cfg).model, value)
    except ConfigError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - anything else is the run's to report, as it would without a resume
        return None
    return None
