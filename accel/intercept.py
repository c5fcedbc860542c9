"""The one way accel runs its code around a call it does not own, and takes it off again.

`around(target, call, slot, layer)` puts `layer(inner, *args, **kwargs)` around `target.<call>`;
`replace(target, call, make)` swaps the call's own computation for `make(own)` (a compiled version)
below every layer. Each returns the function that undoes it, and handles collect those in an
`ExitStack`, so every stage comes off the same way, in any order.

Layers sit at a named slot, outermost first, whatever order the stages were applied in:

    cfg        CFG parallel: whether this rank computes the call at all
    sequence   sequence parallel: split the tokens going in, gather them coming out
    cache      a cache's decisions: run the call, or skip it and hand back a residual
    attention  an attention backend's set-up around the call, or the kernel itself

Two kinds of call are intercepted. A module's `forward` is an instance attribute that
`nn.Module.__call__` looks up (as diffusers' own hooks do), so it is replaced on the instance. Any
other object's `__call__` (a pipeline, an attention processor) is looked up on the class by
`obj(...)`, so the instance gets a subclass of its own class whose `__call__` runs the layers; it
stays an instance of its class, and gets its class back when its last layer comes off.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any, Callable

SLOTS = ("cfg", "sequence", "cache", "attention")
Layer = Callable[..., Any]  # layer(inner, *args, **kwargs) -> output
Undo = Callable[[], None]

_LAYERS = "_accel_layers"  # on the instance: {call name: Layers}


class Layers:
    """The layers on one call of one object, and the chain they make over its own computation."""

    def __init__(self, target: Any, call: str):
        self.target, self.call = target, call
        if call == "forward":
            self.had_own = "forward" in target.__dict__
            self.own = target.forward  # bound
        else:
            self.own = functools.partial(type(target).__call__, target)
        self.base = self.own
        self.layers: list[tuple[int, Layer]] = []
        self.chain: Callable = self.base

    def rebuild(self) -> None:
        chain = self.base
        for _, layer in sorted(self.layers, key=lambda entry: -entry[0]):  # innermost slot first
            chain = functools.partial(layer, chain)
        self.chain = chain
        if not self.layers and self.base is self.own:
            _uninstall(self)


def _layers(target: Any, call: str) -> Layers:
    table = target.__dict__.setdefault(_LAYERS, {})
    if call not in table:
        layers = table[call] = Layers(target, call)
        _install(layers)
    return table[call]


def _install(layers: Layers) -> None:
    target = layers.target
    if layers.call == "forward":
        @functools.wraps(layers.own)  # keeps the signature: bindings read arguments by it
        def forward(*args, **kwargs):
            return layers.chain(*args, **kwargs)

        target.forward = forward
    else:
        target.__class__ = _subclass(type(target))


def _uninstall(layers: Layers) -> None:
    target = layers.target
    if layers.call == "forward":
        if layers.had_own:
            target.forward = layers.own
        else:
            del target.forward
    else:
        target.__class__ = type(target)._accel_own_class
    table = target.__dict__[_LAYERS]
    del table[layers.call]
    if not table:
        del target.__dict__[_LAYERS]


@functools.lru_cache(maxsize=None)
def _subclass(cls: type) -> type:
    """`cls` with a `__call__` that runs the instance's layers (same name, module and signature:
    diffusers reads a processor's parameters, users read a pipeline's)."""

    @functools.wraps(cls.__call__)
    def __call__(self, *args, **kwargs):
        return self.__dict__[_LAYERS]["__call__"].chain(*args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_accel_own_class": cls, "__module__": cls.__module__})


def around(target: Any, call: str, slot: str, layer: Layer) -> Undo:
    """Run `layer(inner, *args, **kwargs)` whenever `target.<call>` runs (`call`: "forward" of a module,
    or "__call__"), at `slot` among its layers; returns what takes it off."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots are {SLOTS}")
    layers = _layers(target, call)
    entry = (SLOTS.index(slot), layer)
    layers.layers.append(entry)
    layers.rebuild()

    def undo() -> None:
        if entry in layers.layers:
            layers.layers.remove(entry)
            layers.rebuild()

    return undo


def around_each(target: Any, call: str, slot: str, context: Callable[[], AbstractContextManager]) -> Undo:
    """Enter `context()` around every `target.<call>` (e.g. a cache's state for one pipeline call)."""

    def layer(inner, *args, **kwargs):
        with context():
            return inner(*args, **kwargs)

    return around(target, call, slot, layer)


def replace(target: Any, call: str, make: Callable[[Callable], Callable]) -> Undo:
    """Put `make(own)` (e.g. the compiled `own`) in place of the call's own computation, below every
    layer; returns what puts the own computation back."""
    layers = _layers(target, call)
    replacement = make(layers.own)
    layers.base = replacement
    layers.rebuild()

    def undo() -> None:
        if layers.base is replacement:
            layers.base = layers.own
            layers.rebuild()

    return undo


def own(target: Any, call: str = "forward") -> Callable:
    """The call's own computation, below any layers."""
    layers = target.__dict__.get(_LAYERS, {}).get(call)
    if layers is not None:
        return layers.own
    return getattr(target, call) if call == "forward" else functools.partial(type(target).__call__, target)
