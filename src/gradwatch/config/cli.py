"""Checks of the command line that must happen before Hydra starts: one clear line, no traceback."""

import os
import sys
from pathlib import Path

# The repository's conf/ folder: the one place it is located.
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def split_override(item: str) -> tuple[str, str] | None:
    """`+model.init={...}` -> ("model.init", "{...}"); None for flags and Hydra's own keys.

    >>> split_override("~optimizer.lr=0.1"), split_override("hydra.run.dir=x"), split_override("-m")
    (('optimizer.lr', '0.1'), None, None)
    """
    key, sep, value = str(item).lstrip("+~").partition("=")
    if not sep or key.startswith("hydra") or key.startswith("-"):
        return None
    return key, value


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The error for the first `group=option` naming an option that does not exist, else None.

    >>> check_group_choices(["model=mlpp"])
    'model=mlpp is not valid: allowed is one of linear, mlp'
    """
    for arg in argv:
        pair = split_override(arg)
        if pair is None:
            continue
        key, value = pair
        if "." in key or not (conf_dir / key).is_dir():
            continue
        if "(" in value or value in ("null", ""):
            continue  # sweep functions such as choice(...) are left to Hydra
        options = group_options(key, conf_dir)
        for choice in value.split(","):
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
