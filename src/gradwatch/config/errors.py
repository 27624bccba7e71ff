"""The error users see for a bad config: one line naming the key, the value and what is allowed."""


class ConfigError(ValueError):
    """A config value that cannot work, found before any training starts.

    >>> str(ConfigError("optimizer.lr", -0.1, "a number > 0"))
    'optimizer.lr=-0.1 is not valid: allowed is a number > 0'
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value} is not valid: allowed is {allowed}")


def is_number(value: object) -> bool:
    """An int or float from a config (YAML booleans are ints to Python, and are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(key: str, value: object, minimum: int | None = None, allowed: str | None = None) -> int:
    """`value` if it is an integer >= `minimum`, else a ConfigError naming `key`."""
    if not is_number(value) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(key, value, allowed or ("an integer" if minimum is None else f"an integer >= {minimum}"))
    return value
