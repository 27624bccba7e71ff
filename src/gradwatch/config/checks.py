"""Every boolean, number and integer key of the config, checked before any work: `check_config(cfg)`.

A bad value stops the run with one line naming the key, as `ConfigError` words it:

    >>> from omegaconf import OmegaConf
    >>> check_config(OmegaConf.create({"dataset": {"shuffle": "abc"}}))
    Traceback (most recent call last):
    gradwatch.config.errors.ConfigError: dataset.shuffle=abc is not valid: allowed is true or false

Keys a config does not have are skipped (each dataset and optimizer option has its own keys);
choices among names (`model.activation`, `telemetry.on_nonfinite`) are checked where they are used.
"""

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from gradwatch.config.errors import ConfigError, check_bool, check_int, check_number, is_number

Rule = Callable[[str, object], object]
_ABSENT = object()
# Lightning's seed_everything accepts what numpy does; torch.Generator takes any unsigned 64-bit seed.
MAX_SEED = 2**32 - 1
MIN_DATA_SEED, MAX_DATA_SEED = -(2**63), 2**64 - 1


def _integer(minimum: int | None = None, allowed: str | None = None, maximum: int | None = None) -> Rule:
    return lambda key, value: check_int(key, value, minimum, allowed, maximum=maximum)


def _number(minimum: float | None = None, *, above: float | None = None, below: float | None = None,
            maximum: float | None = None) -> Rule:
    return lambda key, value: check_number(key, value, minimum, above=above, below=below, maximum=maximum)


def _or_null(rule: Rule, meaning: str = "") -> Rule:
    def check(key: str, value: object) -> object:
        if value is None:
            return None
        try:
            return rule(key, value)
        except ConfigError as err:
            raise ConfigError(key, value, f"null{meaning} or {err.allowed}") from None

    return check


def _at_least_one_or_none(meaning: str) -> Rule:
    # Lightning's -1 means "no limit"; 0 would train nothing and still end as a run.
    def check(key: str, value: object) -> object:
        if not (is_number(value) and isinstance(value, int) and value == -1):
            check_int(key, value, 1, f"an integer >= 1, or -1 (no limit: {meaning})")
        return value

    return check


def _true_false_or_warn(key: str, value: object) -> object:
    # Lightning's `deterministic` also takes "warn": deterministic where torch can, a warning elsewhere.
    if not isinstance(value, bool) and value != "warn":
        raise ConfigError(key, value, "true, false or warn")
    return value


def _betas(key: str, value: object) -> object:
    if not (isinstance(value, list | tuple) and len(value) == 2
            and all(is_number(b) and 0 <= b < 1 for b in value)):
        raise ConfigError(key, value, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    return value


# The scalar keys, by where they are read: top level, checkpoint, log, summary, telemetry, trainer,
# dataset, optimizer, model.
RULES: dict[str, Rule] = {
    "seed": _integer(0, maximum=MAX_SEED),
    "threads": _integer(1),
    "checkpoint.every_n_steps": _integer(1),
    "log.flush_every_n_steps": _integer(1),
    "log.flush_every_s": _number(0),
    "summary.converge_below": _number(0),
    "summary.converge_relative": check_bool,
    "telemetry.enabled": check_bool,
    "telemetry.every_n_steps": _integer(1),
    "telemetry.activations": check_bool,
    "telemetry.histograms_every_n_steps": _integer(0, "an integer >= 0 (0: never)"),
    "telemetry.update_ratio": check_bool,
    "trainer.max_steps": _at_least_one_or_none("trainer.max_epochs decides"),
    "trainer.max_epochs": _or_null(_at_least_one_or_none("trainer.max_steps decides")),
    "trainer.gradient_clip_val": _or_null(_number(0), " (no clipping)"),
    "trainer.deterministic": _true_false_or_warn,
    "trainer.enable_progress_bar": check_bool,
    "trainer.enable_model_summary": check_bool,
    "dataset.size": _integer(1, "an integer >= 1 (a dataset cannot be empty)"),
    "dataset.in_features": _integer(1),
    "dataset.low": _number(),
    "dataset.high": _number(),
    "dataset.noise": _number(0),
    "dataset.train_fraction": _number(above=0, maximum=1),  # dataset=digits
    "dataset.seed": _or_null(_integer(MIN_DATA_SEED, maximum=MAX_DATA_SEED), " (the top-level seed)"),
    "dataset.batch_size": _or_null(_integer(1), " (full batch)"),
    "dataset.shuffle": check_bool,
    "optimizer.lr": _number(above=0),
    "optimizer.momentum": _number(0),
    "optimizer.dampening": _number(),
    "optimizer.weight_decay": _number(0),
    "optimizer.eps": _number(above=0),
    "optimizer.betas": _betas,
    "optimizer.nesterov": check_bool,
    "optimizer.amsgrad": check_bool,
    "optimizer.maximize": check_bool,
    "model.in_features": _or_null(_integer(1), " (follows the dataset)"),
    "model.out_features": _or_null(_integer(1), " (follows the dataset)"),
    "model.bias": check_bool,
    "model.bias_init": _or_null(_number()),
}


def check(key: str, value: object, name: str | None = None) -> object:
    """`value` if the rule for `key` (RULES) accepts it, else a ConfigError naming `name` (default: `key`).

    The one place a scalar key's kind and bounds are stated: the objects that take such a value as an
    argument (datasets, models, callbacks) check it with this, so they say what `check_config` says.

    >>> check("telemetry.every_n_steps", 0, name="every_n_steps")
    Traceback (most recent call last):
    gradwatch.config.errors.ConfigError: every_n_steps=0 is not valid: allowed is an integer >= 1
    """
    try:
        return RULES[key](key, value)
    except ConfigError as err:
        if name is None or name == key:
            raise
        raise ConfigError(name, value, err.allowed) from None


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first scalar key whose value is not of its kind or out of range."""
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        rule(key, value)
