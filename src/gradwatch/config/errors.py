"""The error users see for a bad config: one line naming the key, the value and what is allowed."""

import math


class ConfigError(ValueError):
    """A config value that cannot work, found before any training starts.

    >>> str(ConfigError("optimizer.lr", -0.1, "a number > 0"))
    'optimizer.lr=-0.1 is not valid: allowed is a number > 0'
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value} is not valid: allowed is {allowed}")


def first_line(err: BaseException) -> str:
    """`Type: first line` of an error, the one line a user sees of it; for Hydra's instantiate
    errors, of the error behind them (`calling <target>: Type: line`).

    >>> first_line(ValueError("bad value\\n  details")), first_line(OSError("Error loading 'x':\\n\\nno such file"))
    ('ValueError: bad value', "OSError: Error loading 'x': no such file")
    """
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        target = str(err).split("'")[1] if str(err).count("'") >= 2 else "a _target_"
        return f"calling {target}: {first_line(err.__cause__)}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Error loading 'x':" says why on its last line
        text = f"{text} {lines[-1]}"
    return f"{type(err).__name__}: {text}".rstrip(": ")


def is_number(value: object) -> bool:
    """An int or float from a config (YAML booleans are ints to Python, and are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(key: str, value: object, minimum: int | None = None, allowed: str | None = None, *,
              maximum: int | None = None) -> int:
    """`value` if it is an integer in [`minimum`, `maximum`], else a ConfigError naming `key`.

    >>> check_int("seed", -1, minimum=0)
    Traceback (most recent call last):
    gradwatch.config.errors.ConfigError: seed=-1 is not valid: allowed is an integer >= 0
    """
    if (not is_number(value) or not isinstance(value, int) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        if allowed is None:
            allowed = "an integer"
            if minimum is not None and maximum is not None:
                allowed += f" from {minimum} to {maximum}"
            elif minimum is not None:
                allowed += f" >= {minimum}"
            elif maximum is not None:
                allowed += f" <= {maximum}"
        raise ConfigError(key, value, allowed)
    return value


def check_number(key: str, value: object, minimum: float | None = None, *, above: float | None = None,
                 below: float | None = None, maximum: float | None = None, allowed: str | None = None) -> float:
    """`value` if it is a finite number within the bounds given, else a ConfigError naming `key`.

    The bounds: >= `minimum`, > `above`, < `below`, <= `maximum`.

    Infinity and NaN are never allowed: no key of a run means "unbounded" by them.

    >>> check_number("optimizer.lr", 0.1, above=0)
    0.1
    >>> check_number("optimizer.lr", float("inf"), above=0)
    Traceback (most recent call last):
    gradwatch.config.errors.ConfigError: optimizer.lr=inf is not valid: allowed is a finite number > 0
    """
    finite = is_number(value) and math.isfinite(value)
    if (not finite or (minimum is not None and value < minimum) or (above is not None and value <= above)
            or (below is not None and value >= below) or (maximum is not None and value > maximum)):
        if allowed is None:
            signs = ((">=", minimum), (">", above), ("<", below), ("<=", maximum))
            bounds = [f"{sign} {bound}" for sign, bound in signs if bound is not None]
            # "finite" only where the value is an infinity or NaN: there it is the reason.
            allowed = "a finite number" if is_number(value) and not finite else "a number"
            allowed = " ".join([allowed, " and ".join(bounds)]) if bounds else allowed
        raise ConfigError(key, value, allowed)
    return value


def check_bool(key: str, value: object) -> bool:
    """`value` if it is true or false (a YAML boolean), else a ConfigError naming `key`.

    >>> check_bool("dataset.shuffle", "abc")
    Traceback (most recent call last):
    gradwatch.config.errors.ConfigError: dataset.shuffle=abc is not valid: allowed is true or false
    """
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value
