"""The strategy registry: every transform a recipe can name, with its config schema and its stage.

A recipe names strategies by registered name only; nothing a recipe says is imported or called
outside this table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol

from omegaconf import DictConfig, OmegaConf

from accel.errors import ConfigError
from accel.schema import to_dataclass

# The order `apply` runs stages in, and the reverse of the order `remove` undoes them.
# quant first: it replaces weights and linear layers that every later stage wraps or traces.
# attention next: it swaps attention processors, which context parallelism then shards.
# parallel before cache: a cache must take its decisions on the (sharded) tensors it will see.
# compile last: it compiles each block's own computation as quant and attention left it. It goes
# *below* the cache's layer on each block (accel.models.layered_forward), not around it, so the
# cache's decisions stay eager between compiled regions whatever the order (tested both ways).
STAGES = ("quant", "attention", "parallel", "cache", "compile")


class Handle(Protocol):
    """What applying a strategy returns: it can report what it did and be undone."""

    def stats(self) -> dict[str, Any]: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class Strategy:
    name: str
    stage: str
    config_cls: type
    apply: Callable[..., Handle]  # apply(ctx: ApplyContext, config) -> Handle
    doc: str = ""
    # check(facts: ModelFacts, config) -> problems: what the doctor (and every run, before it starts)
    # asks of this strategy, from the model's configs and the device, without loading weights
    check: Optional[Callable[..., Iterable[str]]] = None


_STRATEGIES: dict[tuple[str, str], Strategy] = {}


def register(name: str, stage: str, config_cls: type, check: Optional[Callable[..., Iterable[str]]] = None):
    """Decorator registering `apply(ctx, config) -> Handle` as strategy `name` of `stage`; `check`
    declares what the doctor verifies before anything loads."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def decorate(apply: Callable[..., Handle]) -> Callable[..., Handle]:
        key = (stage, name)
        if key in _STRATEGIES:
            raise ValueError(f"strategy {stage}/{name} is registered twice")
        _STRATEGIES[key] = Strategy(name, stage, config_cls, apply, (apply.__doc__ or "").strip(), check)
        return apply

    return decorate


def names(stage: str) -> list[str]:
    return sorted(name for s, name in _STRATEGIES if s == stage)


def get(stage: str, name: str) -> Strategy:
    try:
        return _STRATEGIES[(stage, name)]
    except KeyError:
        raise ConfigError(
            f"{stage}.strategy={name!r} is not a registered strategy; available: {', '.join(names(stage))}"
        ) from None


def all_strategies() -> list[Strategy]:
    return [_STRATEGIES[k] for k in sorted(_STRATEGIES, key=lambda k: (STAGES.index(k[0]), k[1]))]


def build_config(stage: str, node: Any, complete: bool = False):
    """Validate one stage's config (a dict or DictConfig with a `strategy` key) into its dataclass.

    Types and unknown keys are checked against the strategy's schema, ranges by the dataclass's own
    `__post_init__`. Errors name the field as `stage.field`. `complete`: a composed recipe, which
    carries every field (a plain dict from Python may leave fields at their defaults).
    """
    if dataclasses.is_dataclass(node):
        node = OmegaConf.structured(node)
    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"{stage}={node!r} must be a mapping with a 'strategy' key")
    strategy = get(stage, node.get("strategy", "none"))
    return to_dataclass(strategy.config_cls, node, where=f"{stage}.", complete=complete)


@dataclass
class NoStrategy:
    """The `none` option of a stage: applies nothing."""

    strategy: str = "none"


class NoHandle:
    def stats(self) -> dict[str, Any]:
        return {}

    def remove(self) -> None:
        pass


for _stage in STAGES:
    register("none", _stage, NoStrategy)(lambda ctx, config: NoHandle())
