"""Where the shipped config groups and recipes live: inside the wheel, or in a source checkout."""
from __future__ import annotations

import os
from pathlib import Path

from accel.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent
_PACKAGED = _PACKAGE / "_conf"  # what the wheel carries (see pyproject's force-include)
_CHECKOUT = _PACKAGE.parent  # an editable install or a plain checkout


def _root() -> Path:
    return _PACKAGED if (_PACKAGED / "conf").is_dir() else _CHECKOUT


def conf_dir() -> Path:
    return _root() / "conf"


def recipes_dir() -> Path:
    return _root() / "recipes"


def user_recipe_dirs() -> list[Path]:
    """Folders of users' own recipes, from ACCEL_RECIPES (os.pathsep-separated); each must be a folder."""
    value = os.environ.get("ACCEL_RECIPES", "")
    folders = [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]
    for folder in folders:
        if not folder.is_dir():
            what = "a file" if folder.exists() else "missing"
            raise ConfigError(f"ACCEL_RECIPES={value!r} names {folder}, which is {what}: it must name folders of "
                              f"recipe files ({os.pathsep!r}-separated)")
    return folders


def cache_dir() -> Path:
    """Where fabricated tiny pipelines are saved once and loaded from."""
    return Path(os.environ.get("ACCEL_CACHE", Path.home() / ".cache" / "accel")).expanduser()
