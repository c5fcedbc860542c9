"""What every strategy's `apply` receives, so stages can build on each other without knowing each other."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from accel.families import for_pipeline
from accel.models.adapters import BlockAdapter
from accel.parallel.mesh import Mesh


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean|now − before| / mean|before|, the distance every cache in the field uses."""
    return ((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12)).item()


@dataclass
class ApplyContext:
    """The pipeline a recipe is applied to, its architecture adapter, the device it runs on, the device
    mesh the caller built (None for one process), and the handles of the stages applied so far.

    `distance` and `cfg_branch` are what the parallel stage tells a cache applied after it: how to
    measure a distance over every rank's tokens, and which CFG branch the running call is (None: count
    the calls of a step)."""

    pipe: Any
    device: torch.device
    mesh: Optional[Mesh] = None
    applied: list[tuple[str, str, Any]] = field(default_factory=list)  # (stage, strategy, handle)
    distance: Callable[[torch.Tensor, torch.Tensor], float] = relative_l1
    cfg_branch: Optional[Callable[[], Optional[int]]] = None

    @functools.cached_property
    def adapter(self) -> BlockAdapter:
        """The pipeline's adapter; an AccelError naming the supported architectures if it has none."""
        return for_pipeline(self.pipe)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.adapter.denoiser(self.pipe)


@dataclass
class AppliedFacts:
    """What a strategy's doctor check reads (accel.doctor.ModelFacts), taken from an applied context, so
    `apply` can run the same check on the loaded model."""

    ctx: ApplyContext

    @property
    def adapter(self) -> BlockAdapter:
        return self.ctx.adapter

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def configs(self) -> dict[str, Any]:
        return {"denoiser": dict(self.ctx.denoiser.config)}
