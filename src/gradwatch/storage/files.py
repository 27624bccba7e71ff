"""Writing files so that a crash never leaves half of one (write beside, then rename), and reading
the YAML a run folder holds."""

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

# The C loader reads a run's config several times faster than the Python one (or OmegaConf.load).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; give it the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so strict JSON readers accept it.

    >>> strict_json({"a": float("nan"), "b": [1.0, float("inf")]})
    {'a': None, 'b': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Strict JSON (no NaN or Infinity: they become null), written atomically."""
    text = json.dumps(strict_json(record), indent=2, default=str, allow_nan=False)
    write_atomic(path, (text + "\n").encode())


def read_yaml(path: Path) -> Any:
    """A YAML file's content (plain dicts and lists), or None when it is missing or unreadable."""
    try:
        return yaml.load(Path(path).read_text(), Loader=YAML_LOADER)
    except (OSError, ValueError, yaml.YAMLError):
        return None
