"""Config fields every cache kind shares, their validation, and what every cache kind declares.

A cache kind's config also says how `accel.tune` searches it (`search_space`, a trial's proposal of
its own fields) and how many blocks a hit still runs (`blocks_on_hit`), so the tuner knows a new kind
without an edit of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accel.errors import require
from accel.registry import DECIDES_BETWEEN_BLOCKS

FORECASTS = ("none", "taylor")


@dataclass(frozen=True)
class CacheControls:
    strategy: str = "none"
    start: float = 0.0  # fraction of the schedule before which every step is computed
    end: float = 1.0  # fraction of the schedule from which every step is computed
    warmup_steps: int = 0  # first steps always computed
    max_consecutive_hits: int = -1  # -1: unlimited; 0: never cache
    max_cached_steps: int = -1  # -1: unlimited; cap on cached calls per branch and generation
    forecast: str = "none"  # none: reuse the cached residual; taylor: extrapolate it from the last full steps
    forecast_order: int = 1

    def __post_init__(self):
        require(0.0 <= self.start <= 1.0, "start", self.start, "a fraction in [0, 1]")
        require(0.0 <= self.end <= 1.0, "end", self.end, "a fraction in [0, 1]")
        require(self.start < self.end, "start", self.start,
                f"a fraction below end={self.end}: hits may happen from start up to end, so start >= end never caches")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        require(self.max_consecutive_hits >= -1, "max_consecutive_hits", self.max_consecutive_hits,
                "-1 (unlimited) or >= 0")
        require(self.max_cached_steps >= -1, "max_cached_steps", self.max_cached_steps, "-1 (unlimited) or >= 0")
        require(self.forecast in FORECASTS, "forecast", self.forecast, f"one of {FORECASTS}")
        require(1 <= self.forecast_order <= 4, "forecast_order", self.forecast_order, "1 to 4")

    def may_hit(self, step: int, steps: int) -> bool:
        """Whether the shared controls let step `step` of `steps` be a hit (step 0 never is: nothing to reuse)."""
        return step >= max(1, self.warmup_steps) and self.start <= step / steps < self.end

    # -- what a cache kind declares ---------------------------------------------------------------
    @staticmethod
    def search_space(trial, blocks: int) -> dict[str, Any]:
        """A trial's proposal of this kind's own fields (an Optuna trial; `blocks`: the denoiser's blocks)."""
        raise NotImplementedError

    def blocks_on_hit(self) -> int:
        """How many blocks a hit still runs."""
        raise NotImplementedError

    def last_step_computes(self) -> bool:
        """Whether this kind always computes the last step."""
        return False


def cache_traits(config: CacheControls) -> set[str]:
    return {DECIDES_BETWEEN_BLOCKS}


def check_controls(facts, config: CacheControls) -> list[str]:
    """The doctor's question every cache kind shares: can any step of this recipe be cached at all?"""
    steps = facts.recipe.steps
    last = steps - 1 if config.last_step_computes() else steps
    if any(config.may_hit(step, steps) for step in range(last)):
        return []
    return [f"warmup_steps={config.warmup_steps}, start={config.start}, end={config.end} leave no step of the "
            f"{steps} that may be cached (step 0 always computes{', and the last' if last < steps else ''}): this "
            "cache would never hit; lower warmup_steps or widen start/end, or use cache=none"]
