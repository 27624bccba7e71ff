"""Command-line overrides read with Hydra's own parser, and the values they gave a run.

The summary's swept columns and the HParams tab both show, for each overridden key, what the run
really used: a group's choice by name (`model=mlp`), any other key's value from the resolved config
(numbers as numbers, lists as readable text such as `[4, 4]`).
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, ListConfig, OmegaConf


def parse(items: Iterable[str]) -> list[Override]:
    """The overrides of the task (Hydra's own keys and flags left out); raises hydra's
    OverrideParseException for text Hydra would refuse.

    >>> [(o.key_or_group, o.is_delete()) for o in parse(["~optimizer.lr=0.1", "hydra.run.dir=x", "+a.b=[1,2]"])]
    [('optimizer.lr', True), ('a.b', False)]
    """
    items = [str(item) for item in items if not str(item).startswith("-")]
    overrides = OverridesParser.create().parse_overrides(items)
    return [o for o in overrides if not o.is_hydra_override()]


def readable(value: Any) -> Any:
    """A config value as a summary cell or an HParams value: numbers, booleans and strings as
    they are, None as None, anything else as compact text.

    >>> readable([4, 4]), readable(0.5), readable({"a": 1})
    ('[4, 4]', 0.5, '{"a": 1}')
    """
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        return json.dumps(value, separators=(", ", ": "), default=str)
    except (TypeError, ValueError):
        return str(value)


def override_values(items: Iterable[str], config: DictConfig | None = None,
                    choices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`{key: value}` for each override: a config group's choice (from Hydra's
    `runtime.choices`), else the value in the resolved `config`, else the value as typed.
    Deletions (`~key`) are not values and are left out.

    >>> override_values(["model=linear", "optimizer.lr=1e-3", "model.hidden=[4,4]", "~seed"])
    {'model': 'linear', 'optimizer.lr': 0.001, 'model.hidden': '[4, 4]'}
    """
    choices = choices or {}
    values: dict[str, Any] = {}
    for override in parse(items):
        if override.is_delete():
            continue
        key = override.key_or_group
        if key in choices:
            values[key] = readable(choices[key])
            continue
        missing = object()
        found = missing
        if config is not None:
            try:
                found = OmegaConf.select(config, key, default=missing)
            except Exception:  # noqa: BLE001 - an unresolvable value is shown as typed
                found = missing
        typed = override.value() if not override.is_sweep_override() else override.get_value_element_as_str()
        if found is missing or (isinstance(found, DictConfig) and isinstance(typed, str)):
            found = typed  # not in the config, or a group option named without Hydra's choices at hand
        values[key] = readable(found)
    return values
