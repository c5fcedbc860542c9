"""A module's forward as layers, so transforms of one block compose in any order and come off in any
order: the block's own computation at the bottom (compile puts its compiled version there) and
wrappers above it (a cache's decisions), each calling the layer below.

This is the seam between a cache and compile: the cache's Python decisions stay in eager code between
compiled regions, and the compiled region is the block's own computation, so it traces with
fullgraph=True and no graph breaks.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

_ATTR = "_accel_layers"
Wrapper = Callable[..., Any]  # wrapper(inner, *args, **kwargs) -> output


class LayeredForward:
    def __init__(self, module: nn.Module):
        self.module = module
        self.had_own_forward = "forward" in module.__dict__
        self.own = module.forward  # the block's own forward, bound
        self.base = self.own
        self.wrappers: list[Wrapper] = []  # innermost first
        self.chain = self.base

        @functools.wraps(self.own)  # keeps the signature: later bindings read arguments by it
        def forward(*args, **kwargs):
            return self.chain(*args, **kwargs)

        module.forward = forward
        setattr(module, _ATTR, self)

    def _rebuild(self) -> None:
        chain = self.base
        for wrapper in self.wrappers:
            chain = functools.partial(wrapper, chain)
        self.chain = chain
        if not self.wrappers and self.base is self.own:
            self._uninstall()

    def _uninstall(self) -> None:
        if self.had_own_forward:
            self.module.forward = self.own
        else:
            del self.module.forward
        delattr(self.module, _ATTR)


def _layers(module: nn.Module) -> LayeredForward:
    return getattr(module, _ATTR, None) or LayeredForward(module)


def wrap(module: nn.Module, wrapper: Wrapper) -> Callable[[], None]:
    """Put `wrapper(inner, *args, **kwargs)` on top of the module's forward; returns its removal."""
    layers = _layers(module)
    layers.wrappers.append(wrapper)
    layers._rebuild()

    def remove() -> None:
        if wrapper in layers.wrappers:
            layers.wrappers.remove(wrapper)
            layers._rebuild()

    return remove


def replace_own(module: nn.Module, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Put `make(own_forward)` (e.g. its compiled version) below every wrapper; returns its removal."""
    layers = _layers(module)
    replacement = make(layers.own)
    layers.base = replacement
    layers._rebuild()

    def remove() -> None:
        if layers.base is replacement:
            layers.base = layers.own
            layers._rebuild()

    return remove


def own_forward(module: nn.Module) -> Callable:
    """The module's own forward, below any layers."""
    layers = getattr(module, _ATTR, None)
    return layers.own if layers is not None else module.forward
