"""What every strategy's `apply` receives, so stages can build on each other without knowing each other."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch

from accel.models.adapters import BlockAdapter, for_pipeline


@dataclass
class ApplyContext:
    """The pipeline a recipe is applied to, its architecture adapter, the device it runs on, the
    device mesh (once the parallel stage made one), and the handles of the stages applied so far."""

    pipe: Any
    device: torch.device
    applied: list[tuple[str, str, Any]] = field(default_factory=list)  # (stage, strategy, handle)
    mesh: Any = None

    @functools.cached_property
    def adapter(self) -> BlockAdapter:
        """The pipeline's adapter; an AccelError naming the supported architectures if it has none."""
        return for_pipeline(self.pipe)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.adapter.denoiser(self.pipe)

    def handle(self, stage: str) -> Optional[Any]:
        """The handle of the strategy applied at `stage`, if one is."""
        return next((handle for s, _, handle in self.applied if s == stage), None)


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

    @property
    def stages(self) -> dict[str, Any]:
        return {stage: SimpleNamespace(strategy=name) for stage, name, _ in self.ctx.applied}
