"""The strategy registry: every transform a recipe can name, with its config schema and its stage.

A recipe names strategies by registered name only; nothing a recipe says is imported or called
outside this table.
"""
from __future__ import annotations

import dataclasses
import typing
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
# *below* the cache's layer on each block (accel.intercept.replace), not around it, so the
# cache's decisions stay eager between compiled regions whatever the order (tested both ways).
STAGES = ("quant", "attention", "parallel", "cache", "compile")


class Handle(Protocol):
    """What applying a strategy returns: it can report what it did and be undone."""

    def stats(self) -> dict[str, Any]: ...

    def remove(self) -> None: ...


# What a strategy does that another may not sit with: a strategy declares its traits and the traits it
# excludes (with why), and the doctor refuses a recipe where one stage excludes what another does, so no
# stage names another by its strategy name.
BYPASSES_TORCH_SDPA = "bypasses_torch_sdpa"  # attention by a kernel that does not go through torch's SDPA name
DECIDES_BETWEEN_BLOCKS = "decides_between_blocks"  # Python decisions between the denoiser's blocks (every cache)


def _nothing(config) -> Any:
    return {}


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
    traits: Callable[[Any], Iterable[str]] = _nothing  # traits(config): what this strategy does (above)
    excludes: Callable[[Any], dict[str, str]] = _nothing  # excludes(config): {trait: why it cannot sit with it}


_STRATEGIES: dict[tuple[str, str], Strategy] = {}


def register(name: str, stage: str, config_cls: type, check: Optional[Callable[..., Iterable[str]]] = None,
             traits: Callable[[Any], Iterable[str]] = _nothing, excludes: Callable[[Any], dict[str, str]] = _nothing):
    """Decorator registering `apply(ctx, config) -> Handle` as strategy `name` of `stage`; `check`
    declares what the doctor verifies before anything loads, `traits` and `excludes` what it cannot
    sit with."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    _check_optional_defaults(config_cls)

    def decorate(apply: Callable[..., Handle]) -> Callable[..., Handle]:
        key = (stage, name)
        if key in _STRATEGIES:
            raise ValueError(f"strategy {stage}/{name} is registered twice")
        _STRATEGIES[key] = Strategy(name, stage, config_cls, apply, (apply.__doc__ or "").strip(), check, traits,
                                    excludes)
        return apply

    return decorate


def _check_optional_defaults(config_cls: type) -> None:
    """A composed stage node leaves a field null where the recipe did not set it, and the field then
    takes its default: so a field that may be null must default to null, or null would mean two things."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        optional = type(None) in typing.get_args(hints[f.name])
        if optional and f.default is not None:
            raise ValueError(f"{config_cls.__name__}.{f.name} may be null, so its default must be null")


def names(stage: str) -> list[str]:
    return sorted(name for s, name in _STRATEGIES if s == stage)


def get(stage: str, name: str) -> Strategy:
    try:
        return _STRATEGIES[(stage, name)]
    except KeyError:
        raise ConfigError(
            f"{stage}.strategy={name!r} is not a registered strategy; available: {', '.join(names(stage))}"
        ) from None


def strategies(stage: Optional[str] = None) -> list[Strategy]:
    """Every registered strategy (of `stage`), in the order apply runs their stages."""
    found = [_STRATEGIES[k] for k in sorted(_STRATEGIES, key=lambda k: (STAGES.index(k[0]), k[1]))]
    return [s for s in found if stage is None or s.stage == stage]


def build_config(stage: str, node: Any, user_keys: Optional[Iterable[str]] = None) -> tuple[Any, list[str]]:
    """Validate one stage's config (a dict or DictConfig with a `strategy` key) into its dataclass, and
    say what was dropped.

    Types and unknown keys are checked against the strategy's schema, ranges by the dataclass's own
    `__post_init__`; errors name the field as `stage.field`. A null field takes its default. A composed
    recipe carries every field of every strategy of the stage (so switching the strategy on the command
    line keeps the fields they share): a field the chosen strategy does not have is dropped, with a
    note, unless the user set it (`user_keys`: dotted keys; None: every key is the user's).
    """
    if dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(f"{stage}={node!r} must be a mapping with a 'strategy' key")
    strategy = get(stage, node.get("strategy") or "none")
    own = {f.name for f in dataclasses.fields(strategy.config_cls)}
    users = None if user_keys is None else set(user_keys)
    kept, dropped = {}, []
    for key, value in node.items():
        if key not in own and users is not None and f"{stage}.{key}" not in users:
            if value not in (None, {}):  # null, or an empty map: what a composed node holds for fields unset
                dropped.append(f"{stage}.{key}={value!r}")
        elif value is not None or key not in own:
            kept[key] = value
    notes = [f"{stage}={strategy.name} has no {', '.join(d.split('=')[0] for d in dropped)}: left out "
             f"({', '.join(dropped)}, set for another {stage} strategy)"] if dropped else []
    return to_dataclass(strategy.config_cls, kept, where=f"{stage}.", label=f"{stage}={strategy.name}"), notes


def conflicts(configs: dict[str, Any]) -> list[str]:
    """Each pair of stages where one excludes a trait of the other, as one line saying why."""
    declared = {stage: get(stage, config.strategy) for stage, config in configs.items()}
    problems = []
    for stage, config in configs.items():
        for trait, why in declared[stage].excludes(config).items():
            for other, other_config in configs.items():
                if other != stage and trait in set(declared[other].traits(other_config)):
                    problems.append(f"{stage}={config.strategy} cannot run with {other}={other_config.strategy}: {why}")
    return problems


@dataclass(frozen=True)
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
