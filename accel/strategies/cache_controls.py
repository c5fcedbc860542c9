"""Config fields every cache kind shares, and their validation."""
from __future__ import annotations

from dataclasses import dataclass

from accel.errors import require

FORECASTS = ("none", "taylor")


@dataclass
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
