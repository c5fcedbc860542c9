"""First Block Cache (ParaAttention, WaveSpeed): run block 0; when its residual moved less than
`residual_diff_threshold` (relative L1) since the last full step, skip every later block and add
their residual from that step instead."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

import torch

from accel.errors import require
from accel.context import ApplyContext
from accel.registry import register
from accel.strategies.block_cache import BlockCache, CallState
from accel.strategies.cache_controls import CacheControls, cache_traits, check_controls


class ResidualDiffDecider:
    """Probes the residual of the first blocks (H_probe − H_input) against the last full step's; or,
    where blocks change the resolution (UNets), the probe block's output itself."""

    def __init__(self, thresholds: dict[int, float], residual: bool = True):
        self.thresholds = thresholds  # probe block index -> threshold
        self.residual = residual

    def probes(self, n_blocks: int) -> list[int]:
        return sorted(self.thresholds)

    def indicator(self, probe, call: CallState, hidden, block, args, kwargs) -> torch.Tensor:
        return hidden - call.span_input[0] if self.residual else hidden

    def distance(self, probe: int, indicator: torch.Tensor, call: CallState) -> Optional[float]:
        reference = call.branch.decider.get(probe)
        if reference is None or reference.shape != indicator.shape:
            return None
        return call.relative_l1(indicator, reference)

    def passes(self, probe: int, distance: float, call: CallState) -> bool:
        return distance < self.thresholds[probe]

    def end_call(self, call: CallState, computed: bool) -> None:
        if computed:  # compare with the last *full* step, so drift cannot creep through a run of hits
            call.branch.decider.update(call.indicators)

    def must_compute(self, call: CallState) -> bool:
        return False

    threshold_name = "residual_diff_threshold"

    @property
    def threshold(self) -> float:
        return max(self.thresholds.values())

    def caches_about_half(self, distances: list[float]) -> float:
        """Each hit is measured against the last full step, so a threshold at the median distance
        between full steps lets about every other step through."""
        return statistics.median(distances)


@dataclass(frozen=True)
class FBCacheConfig(CacheControls):
    strategy: str = "fbcache"
    residual_diff_threshold: float = 0.08  # 0: never cache (output equals the baseline)

    def __post_init__(self):
        super().__post_init__()
        require(self.residual_diff_threshold >= 0, "residual_diff_threshold", self.residual_diff_threshold,
                ">= 0 (0 never caches)")

    @staticmethod
    def search_space(trial, blocks: int) -> dict:
        return {"residual_diff_threshold": trial.suggest_float("fbcache.residual_diff_threshold", 0.02, 0.6, log=True)}

    def blocks_on_hit(self) -> int:
        return 1  # the probe block


@register("fbcache", stage="cache", config_cls=FBCacheConfig, traits=cache_traits, check=check_controls)
def apply_fbcache(ctx: ApplyContext, config: FBCacheConfig) -> BlockCache:
    """First Block Cache: probe block 0's residual, skip all later blocks on a hit."""
    adapter = ctx.adapter
    decider = ResidualDiffDecider({0: config.residual_diff_threshold}, residual=adapter.residual_base == "probe")
    return BlockCache(ctx, config, decider)
