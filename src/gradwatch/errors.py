"""The error users see for a bad config: one line naming the key, the value and what is allowed."""


class ConfigError(ValueError):
    """A config value that cannot work, found before any training starts.

    >>> str(ConfigError("optimizer.lr", -0.1, "a number > 0"))
    'optimizer.lr=-0.1 is not valid: allowed is a number > 0'
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value} is not valid: allowed is {allowed}")
