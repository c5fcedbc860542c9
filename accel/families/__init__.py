"""Every model family accel supports, one module each, discovered.

A family's module holds everything accel knows of it: the denoiser class it matches and how its
blocks pass their streams (its BlockAdapter: block lists, each block class's IO, the TeaCache probe and
published coefficients, the sequence plan for context parallelism, the size rule), the pipeline
classes it covers, and how its tiny pipeline is fabricated offline. It calls `register(Family(...))`;
importing this package imports every module in it. Adding a family is its module here and its two
model options (`conf/model/<name>.yaml` for the real weights, `conf/model/<name>_tiny.yaml` for the
tiny pipeline), and no edit elsewhere: the tests enumerate what is registered.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from accel.errors import AccelError
from accel.models.adapters import BlockAdapter, unwrap


@dataclass(frozen=True)
class Variant:
    """A pipeline class a family covers beside its main one, made from the main pipeline's components,
    and what a generation with it needs beyond a prompt (an input image, a mask)."""

    pipeline_class: str
    inputs: Callable[[Any, dict], dict] = lambda pipe, size: {}  # inputs(pipe, size) -> extra call kwargs
    components: Callable[[Any], dict] = lambda pipe: {}  # components beyond the main pipeline's (a ControlNet)


@dataclass(frozen=True)
class Family:
    adapter: BlockAdapter
    build_tiny: Callable[..., Any]  # build_tiny(seed, **denoiser_overrides) -> the tiny pipeline, in memory
    variants: tuple[Variant, ...] = ()
    # what the guarantee tests pass to a generation of the tiny pipeline: its size (and frames), and
    # what turns classifier-free guidance on (two calls per step, or a batch of two)
    tiny_call: dict = field(default_factory=lambda: {"height": 64, "width": 64})
    cfg_call: dict = field(default_factory=lambda: {"guidance_scale": 5.0})

    @property
    def name(self) -> str:
        return self.adapter.architecture

    @property
    def pipelines(self) -> tuple[str, ...]:
        """Every pipeline class it covers, its main one (what `load_pipeline` builds) first."""
        return (self.adapter.pipeline_class, *(v.pipeline_class for v in self.variants))

    def variant(self, base_pipe, variant: Variant):
        """A pipeline of `variant`'s class over the components of `base_pipe` (diffusers' from_pipe)."""
        import diffusers

        return getattr(diffusers, variant.pipeline_class).from_pipe(base_pipe, **variant.components(base_pipe))


FAMILIES: dict[str, Family] = {}
ADAPTERS: dict[str, BlockAdapter] = {}  # by architecture: what the caches and the doctor read


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name} is registered twice")
    FAMILIES[family.name] = family
    ADAPTERS[family.name] = family.adapter
    return family


def for_pipeline(pipe) -> BlockAdapter:
    """The adapter of the family that covers this pipeline's class (or a class it derives from), else of
    the one whose denoiser class the pipeline holds; an AccelError naming the supported families if none."""
    family = family_of_pipeline(pipe)
    if family is not None:
        return family.adapter
    held = {attr: type(unwrap(getattr(pipe, attr))).__name__ for attr in ("transformer", "unet")
            if getattr(pipe, attr, None) is not None}
    supported = ", ".join(f"{f.name} ({f.adapter.denoiser_class})" for f in FAMILIES.values())
    raise AccelError(f"{type(pipe).__name__} with denoiser {held or 'none'} has no block adapter; supported "
                     f"families: {supported}")


def family_of_pipeline(pipe) -> Optional[Family]:
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for name in names:
        for family in FAMILIES.values():
            if name in family.pipelines:
                return family
    for family in FAMILIES.values():
        denoiser = unwrap(getattr(pipe, family.adapter.denoiser_attr, None))
        if denoiser is not None and isinstance(denoiser, family.adapter.denoiser_type()):
            return family
    return None


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
