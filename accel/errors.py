"""User-facing errors: the CLI prints these as one clear message, without a traceback."""
import sys
from typing import Callable


class AccelError(Exception):
    """Something the user can fix: a config value, a missing file, a model a strategy does not fit."""


class ConfigError(AccelError):
    """A recipe or override that does not compose or does not validate."""


class Interrupted(Exception):
    """Ctrl-C during a run: what it was doing, and where the report of what it measured is."""


def require(ok: bool, field: str, value, allowed: str) -> None:
    """Raise a ConfigError naming the field, the value and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")


def one_line_errors(command: Callable[[], None]) -> None:
    """Run a command-line program: an AccelError is one line on stderr and exit code 2, no traceback."""
    try:
        command()
    except AccelError as err:
        print(f"accel: error: {err}", file=sys.stderr)
        sys.exit(2)
