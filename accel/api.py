"""The public verbs: compose a recipe, load its pipeline, apply it to any pipeline, undo it."""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline

from accel import registry
from accel.config import compose
from accel.context import ApplyContext
from accel.errors import AccelError, ConfigError
from accel.families import for_pipeline
from accel.models.loading import load
from accel.parallel.mesh import Mesh, join
from accel.recipe import ModelConfig, Recipe, check_device
from accel.strategies.parallel import MeshConfig

__all__ = ["compose", "load_pipeline", "apply", "Run"]

_ACTIVE_ATTR = "_accel_run"


def load_pipeline(model: Union[str, ModelConfig, Recipe], device: str = "auto"):
    """The diffusers pipeline a model names: a model option (`"flux_tiny"`), a recipe's `model`, or a
    Recipe (its model). Weights load as safetensors only."""
    if isinstance(model, str):
        model = compose(None, [f"model={model}"]).model
    elif isinstance(model, Recipe):
        model = model.model
    if not isinstance(model, ModelConfig):
        raise AccelError(f"load_pipeline takes a model option name, a ModelConfig (recipe.model) or a Recipe; got "
                         f"{type(model).__name__}")
    check_device(device)
    return load(model, device)


class Run:
    """The strategies a recipe applied to one pipeline. `remove()` (or leaving `with`) undoes them
    in reverse order, leaving the pipeline exactly as it was."""

    def __init__(self, pipe, applied: list[tuple[str, str, Any]]):
        self.pipe = pipe
        self.applied = applied  # (stage, strategy name, handle), in the order applied
        self._undo = contextlib.ExitStack()

    def stats(self) -> dict[str, dict]:
        """Per stage, what its strategy did in the latest generation (e.g. cache hits per step)."""
        return {stage: {"strategy": name, **handle.stats()} for stage, name, handle in self.applied}

    def remove(self) -> None:
        self._undo.close()
        self.applied.clear()

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
    if not isinstance(pipe, DiffusionPipeline):
        raise AccelError(f"accel.apply takes a diffusers pipeline (a DiffusionPipeline such as FluxPipeline); got "
                         f"{type(pipe).__name__}")
    try:
        return [pipe, for_pipeline(pipe).denoiser(pipe)]
    except AccelError:
        return [pipe]  # no adapter: the strategies that need one say so


def stage_configs(recipe: Union[str, dict, Recipe], overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Optional[Recipe]]:
    """The validated config of every stage a recipe (name, Recipe or plain dict of stages) names."""
    if isinstance(recipe, str):
        recipe = compose(recipe, overrides)
    elif overrides:
        raise AccelError("overrides apply to a recipe name; for a Recipe use recipe.replace(...), for a dict edit it")
    if isinstance(recipe, Recipe):
        return recipe.stages(), recipe
    if not isinstance(recipe, dict):
        raise AccelError(f"accel.apply takes a recipe name, a Recipe (accel.compose) or a dict of stage configs such "
                         f"as {{'cache': {{'strategy': 'fbcache'}}}}; got {type(recipe).__name__}")
    unknown = [key for key in recipe if key not in registry.STAGES]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a stage of a recipe: the stages are {', '.join(registry.STAGES)} "
                          f"(for example {{'cache': {{'strategy': 'fbcache'}}}}; a whole recipe: accel.compose)")
    configs = {stage: registry.build_config(stage, node)[0] for stage, node in recipe.items()}
    problems = registry.conflicts(configs)
    if problems:
        raise ConfigError(problems[0])
    return configs, None


def apply(pipe, recipe: Union[str, dict, Recipe], overrides: Sequence[str] = (), mesh: Optional[Mesh] = None) -> Run:
    """Apply a recipe's strategies (a recipe name, a Recipe from `compose`, or a plain dict of stage
    configs) to `pipe`, stage by stage in `registry.STAGES` order. `mesh`: the device mesh of a parallel
    recipe, when the caller built it (else it is built here, under torchrun or a process group of yours,
    and ends with the run)."""
    configs, whole = stage_configs(recipe, overrides)  # validated before the pipeline is touched
    guarded = _guarded(pipe)
    if whole is not None and len(guarded) > 1:
        architecture = for_pipeline(pipe).architecture
        if whole.model.architecture != architecture:
            raise AccelError(f"this recipe is for {whole.model.architecture} models (model.architecture) and this "
                             f"{type(pipe).__name__} is a {architecture} pipeline: thresholds and coefficients "
                             f"differ by family; compose a {architecture} recipe, or apply only its stages: "
                             "accel.apply(pipe, {'cache': dataclasses.asdict(recipe.cache)})")
    for target in guarded:
        active = target.__dict__.get(_ACTIVE_ATTR)
        if active is not None:
            where = "this pipeline" if target is pipe else f"its {type(target).__name__} (shared with another pipeline)"
            raise AccelError(f"{where} already has {active!r} applied: remove() that run first")
    run = Run(pipe, [])
    try:
        parallel = configs.get("parallel")
        if mesh is None and isinstance(parallel, MeshConfig):
            mesh = join(parallel.degrees, parallel.backend, parallel.timeout_s, pipe.device)
            if mesh is not None:
                run._undo.callback(mesh.close)
        ctx = ApplyContext(pipe, device=pipe.device, mesh=mesh, applied=run.applied)
        for stage in registry.STAGES:
            config = configs.get(stage)
            if config is None or config.strategy == "none":
                continue
            handle = registry.get(stage, config.strategy).apply(ctx, config)
            run.applied.append((stage, config.strategy, handle))
            run._undo.callback(handle.remove)
    except BaseException:
        run.remove()
        raise
    for target in guarded:
        target.__dict__[_ACTIVE_ATTR] = run
        run._undo.callback(target.__dict__.pop, _ACTIVE_ATTR, None)
    return run
