"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class AccelError(Exception):
    """Something the user can fix: a config value, a missing file, a model a strategy does not fit."""


class ConfigError(AccelError):
    """A recipe or override that does not compose or does not validate."""


def require(ok: bool, field: str, value, allowed: str) -> None:
    """Raise a ConfigError naming the field, the value and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")
