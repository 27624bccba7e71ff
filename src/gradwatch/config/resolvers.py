"""OmegaConf resolvers used by the configs (registered on import of the package)."""

import hashlib
import re

from omegaconf import OmegaConf

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
_MAX_NAME = 120
# Digits of a run's number in its sweep folder's name: `007_...` sorts before `010_...` up to 999 runs.
RUN_NUMBER_DIGITS = 3


def padded(number: object) -> str:
    """A job number zero-padded, so that a sweep's run folders sort in run order.

    >>> padded(7), padded("12"), padded(1234)
    ('007', '012', '1234')
    """
    return f"{int(number):0{RUN_NUMBER_DIGITS}d}"


def safe_dirname(text: str) -> str:
    """A folder name for a run's overrides: only safe characters, never too long.

    >>> safe_dirname("model=mlp,ckpt_path=/tmp/a:b")
    'model=mlp,ckpt_path=_tmp_a_b'
    """
    name = _UNSAFE.sub("_", str(text))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_NAME - 9]}-{digest}"
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("gw_safe"):
        OmegaConf.register_new_resolver("gw_safe", safe_dirname)
    if not OmegaConf.has_resolver("gw_padded"):
        OmegaConf.register_new_resolver("gw_padded", padded)
