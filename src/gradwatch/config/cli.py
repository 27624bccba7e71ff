"""Checks of the command line that must happen before Hydra starts: one clear line, no traceback,
exit 2, and no run folder made. Also the one place the repository's configs are located and composed.
"""

import difflib
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# The repository's conf/ folder: the one place it is located.
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
PRIMARY = "train"
MULTIRUN_FLAGS = {"-m", "--multirun"}


def compose(overrides: list[str], conf_dir: Path = CONF_DIR, hydra: bool = False) -> DictConfig:
    """The config `train.py OVERRIDES` runs (with Hydra's own node when `hydra`), composed by Hydra."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return hydra_compose(PRIMARY, overrides=list(overrides), return_hydra_config=hydra)


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


def _first_choice(override) -> str | None:
    """The override as typed, a sweep reduced to its first value (None when Hydra alone can expand it)."""
    if not override.is_sweep_override():
        return override.input_line
    try:
        first = next(iter(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - glob() and the like: Hydra's to expand
        return None
    return f"{override.get_key_element()}={first}"


def _is_group(key: str, conf_dir: Path) -> bool:
    return "/" in key or ("." not in key and (conf_dir / key).is_dir())


def unknown_key(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The error for the first `key=value` whose key the composed config does not have, else None.

    >>> unknown_key(["optimizr.lr=0.1"])  # doctest: +ELLIPSIS
    'optimizr.lr=0.1 is not valid: allowed is a key of the config (did you mean optimizer.lr?): the groups ...'
    """
    from hydra.core.override_parser.types import OverrideType

    from gradwatch.config.errors import ConfigError

    parsed = _parsed(argv)
    groups = [o for o in parsed if _is_group(o.key_or_group, conf_dir) and not o.is_sweep_override()]
    try:
        tree = OmegaConf.to_container(compose([o.input_line for o in groups], conf_dir, hydra=True), resolve=False)
    except Exception:  # noqa: BLE001 - the group choices themselves fail: Hydra's to report
        return None
    for override in parsed:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package is not None or _is_group(key, conf_dir):
            continue
        node, path = tree, []
        for part in key.split("."):
            if not isinstance(node, dict):
                break  # a list or a null: its items are Hydra's to check
            if part not in node:
                value = override.input_line.split("=", 1)[1]
                # A typo's nearest key, with the rest of what was typed: optimizr.lr -> optimizer.lr.
                close = difflib.get_close_matches(part, [str(k) for k in node if k != "hydra"], n=1)
                rest = key.split(".")[len(path) + 1:]
                hint = f" (did you mean {'.'.join([*path, close[0], *rest])}?)" if close else ""
                if path:
                    allowed = f"a key of {'.'.join(path)}{hint}: {', '.join(sorted(map(str, node)))}"
                else:
                    names = [g.name for g in sorted(conf_dir.iterdir()) if g.is_dir() and g.name != "hydra"]
                    keys = sorted(k for k in node if k not in names and k != "hydra")
                    allowed = (f"a key of the config{hint}: the groups {', '.join(names)} or the keys "
                               f"{', '.join(keys)} (+{key}=... adds a new key)")
                return str(ConfigError(key, value, allowed))
            node, path = node[part], [*path, part]
    return None


def check_composed(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The error for an override the config has no key for, or (a single run) for a value
    `check_config` refuses; None when the command may go on (Hydra reports what it alone knows)."""
    from gradwatch.config.checks import check_config
    from gradwatch.config.errors import ConfigError, first_line

    if any(arg.startswith("-") and arg not in MULTIRUN_FLAGS for arg in argv):
        return None  # --help, --cfg, --config-name, ...: Hydra's own commands
    overrides = [line for line in map(_first_choice, _parsed(argv)) if line is not None]
    try:
        cfg = compose(overrides, conf_dir, hydra=True)
    except Exception as err:  # noqa: BLE001 - whatever Hydra refuses, in one line
        return unknown_key(argv, conf_dir) or f"the overrides cannot be applied: {first_line(err)}"
    if _multirun(argv) or str(OmegaConf.select(cfg, "hydra.mode")).endswith("MULTIRUN"):
        return None  # each run of a sweep is checked, and its refusal recorded, by the pipeline
    try:
        check_config(cfg)
    except ConfigError as err:
        return str(err)
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
    message = check_group_choices(argv, conf_dir) or check_output_folder(argv) or check_composed(argv, conf_dir)
    if message:
        refuse(message)


def refuse(message: str) -> None:
    """A refused command: its one line, exit 2."""
    print(f"gradwatch: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _multirun(argv: list[str]) -> bool:
    return bool(MULTIRUN_FLAGS & set(argv))


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
    from gradwatch.config.errors import ConfigError
    from gradwatch.training.checkpointing import check_fits, read_checkpoint, resolve_ckpt_path

    try:
        path = resolve_ckpt_path(value, folder or Path.cwd())
        checkpoint = read_checkpoint(path, value)
        from gradwatch.config.build import build

        check_fits(checkpoint, build(compose([o.input_line for o in _parsed(argv)], conf_dir)).model, value)
    except ConfigError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - anything else is the run's to report, as it would without a resume
        return None
    return None
