"""One way to turn a config node into its typed dataclass, with errors that name the field.

Schemas are closed: a key the dataclass does not declare fails, also when Hydra's `+key` appended it
(Hydra opens the struct flag for that), and a field removed with `~key` fails instead of silently
coming back with its default.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from accel.errors import ConfigError


def to_dataclass(cls: type, node: Any, where: str = "", complete: bool = False, label: str = ""):
    """`node` (a DictConfig or dict) as an instance of dataclass `cls`, its `__post_init__` checks run.

    `where` prefixes field names in errors (`cache.`) and `label` names the node (default: the class);
    `complete` also refuses removed fields, as a composed recipe always carries every field.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(f"{where.rstrip('.') or 'recipe'}={node!r} must be a mapping of fields")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in node if key not in names]
    if unknown:
        raise ConfigError(f"{where}{unknown[0]} is not a field of {label or cls.__name__}; its fields are: "
                          f"{', '.join(names)}")
    removed = [name for name in names if name not in node] if complete else []
    if removed:
        raise ConfigError(f"{where}{removed[0]} cannot be removed: it is a required field; set a value instead "
                          f"({where}{removed[0]}=...)")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(describe(err, where)) from None


def describe(err: OmegaConfBaseException, where: str = "") -> str:
    """OmegaConf's message, first line only, after the full name of the field it is about."""
    message = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{where}{key}: {message}" if key else f"{where.rstrip('.') or 'recipe'}: {message}"
