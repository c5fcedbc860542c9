"""Run code around every call of a pipeline the user holds, so per-generation state is created at
the start of `pipe(...)` and dropped at its end.

`pipe(...)` looks `__call__` up on the class, so the pipeline's class is swapped for a subclass
whose `__call__` enters the registered hooks; removing the last hook puts the original class back.
The pipeline stays an instance of its own class throughout.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

_HOOKS_ATTR = "_accel_call_hooks"
_SUBCLASSES: dict[type, type] = {}


def _subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:

        @functools.wraps(cls.__call__)  # keeps the pipeline's signature and docs visible
        def __call__(self, *args, **kwargs):
            with contextlib.ExitStack() as stack:
                for hook in list(getattr(self, _HOOKS_ATTR)):
                    stack.enter_context(hook())
                return cls.__call__(self, *args, **kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_accel_original_class": cls})
    return _SUBCLASSES[cls]


def add_call_hook(pipe, hook: Callable[[], ContextManager]) -> Callable[[], None]:
    """Enter `hook()` around every `pipe(...)`; returns a function that removes it."""
    hooks = pipe.__dict__.setdefault(_HOOKS_ATTR, [])
    if not hooks:
        pipe.__class__ = _subclass(type(pipe))
    hooks.append(hook)

    def remove() -> None:
        if hook in hooks:
            hooks.remove(hook)
            if not hooks:
                pipe.__class__ = pipe.__class__._accel_original_class
                del pipe.__dict__[_HOOKS_ATTR]

    return remove
