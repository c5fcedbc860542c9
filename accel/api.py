"""The public verbs: compose a recipe, load its pipeline, apply it to any pipeline, undo it."""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf

from accel import registry
from accel.config import compose as _compose
from accel.config import setup, strategy_configs
from accel.context import ApplyContext
from accel.errors import AccelError
from accel.models.adapters import for_pipeline
from accel.models.loading import load_pipeline

__all__ = ["compose", "load_pipeline", "apply", "Run"]

_ACTIVE_ATTR = "_accel_run"


def compose(recipe: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed, validated recipe, exactly as `python -m accel recipe=NAME OVERRIDES...` sees it."""
    return _compose(recipe, overrides)


class Run:
    """The strategies a recipe applied to one pipeline. `remove()` (or leaving `with`) undoes them
    in reverse order, leaving the pipeline exactly as it was."""

    def __init__(self, pipe, applied: list[tuple[str, str, Any]], guarded: Sequence[Any] = ()):
        self.pipe = pipe
        self.applied = applied  # (stage, strategy name, handle), in the order applied
        self.guarded = list(guarded)  # the objects this run marked as carrying it

    def stats(self) -> dict[str, dict]:
        """Per stage, what its strategy did in the latest generation (e.g. cache hits per step)."""
        return {stage: {"strategy": name, **handle.stats()} for stage, name, handle in self.applied}

    def remove(self) -> None:
        while self.applied:
            self.applied.pop()[2].remove()
        for target in self.guarded:
            if target.__dict__.get(_ACTIVE_ATTR) is self:
                del target.__dict__[_ACTIVE_ATTR]
        self.guarded = []

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Run({', '.join(f'{stage}={name}' for stage, name, _ in self.applied) or 'nothing applied'})"


def _guarded(pipe) -> list:
    """What a run hooks: the pipeline (its calls) and its denoiser (the blocks). Guarding the denoiser
    too stops a second pipeline that shares it from stacking hooks that could be removed out of order."""
    if isinstance(pipe, torch.nn.Module):
        raise AccelError(f"accel.apply takes the pipeline that holds this {type(pipe).__name__} (e.g. a diffusers "
                         "FluxPipeline), not the model itself: caches also hook the pipeline's calls, to start "
                         "every generation with fresh state")
    try:
        return [pipe, for_pipeline(pipe).denoiser(pipe)]
    except AccelError:
        return [pipe]  # no adapter: the strategies that need one say so


def apply(pipe, recipe: Union[str, dict, DictConfig], overrides: Sequence[str] = ()) -> Run:
    """Apply a recipe's strategies (a recipe name, a composed recipe, or a plain dict of stage
    configs) to `pipe`, stage by stage in `registry.STAGES` order."""
    setup()
    if isinstance(recipe, str):
        recipe = compose(recipe, overrides)
    elif overrides:
        raise AccelError("overrides apply to a recipe name; merge them into the dict or DictConfig instead")
    if isinstance(recipe, dict):
        recipe = OmegaConf.create(recipe)
    guarded = _guarded(pipe)
    for target in guarded:
        active = target.__dict__.get(_ACTIVE_ATTR)
        if active is not None:
            where = "this pipeline" if target is pipe else f"its {type(target).__name__} (shared with another pipeline)"
            raise AccelError(f"{where} already has {active!r} applied: remove() that run first")
    configs = strategy_configs(recipe)  # validate every stage before touching the pipeline
    run = Run(pipe, [])
    ctx = ApplyContext(pipe, device=pipe.device, applied=run.applied)
    try:
        for stage in registry.STAGES:
            config = configs.get(stage)
            if config is None or config.strategy == "none":
                continue
            handle = registry.get(stage, config.strategy).apply(ctx, config)
            run.applied.append((stage, config.strategy, handle))
    except BaseException:
        run.remove()
        raise
    if run.applied:
        run.guarded = guarded
        for target in guarded:
            target.__dict__[_ACTIVE_ATTR] = run
    return run
