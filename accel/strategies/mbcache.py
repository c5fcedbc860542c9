"""Multi-block cache (cache-dit's DBCache Fn/Bn, ComfyUI-Lightning's MBCache): always compute the first
`first_blocks` and the last `last_blocks` blocks, probe the residual of the first ones, and cache the
span between. With `probe: per_block`, probe after each of the first blocks and stop at the first one
that passes (FBCache is first_blocks=1, last_blocks=0)."""
from __future__ import annotations

from dataclasses import dataclass

from accel.errors import AccelError, require
from accel.context import ApplyContext
from accel.registry import register
from accel.strategies.block_cache import BlockCache
from accel.strategies.cache_controls import CacheControls, cache_traits, check_controls
from accel.strategies.fbcache import ResidualDiffDecider

PROBES = ("last_first_block", "per_block")


@dataclass(frozen=True)
class MBCacheConfig(CacheControls):
    strategy: str = "mbcache"
    residual_diff_threshold: float = 0.08  # 0: never cache
    first_blocks: int = 8  # Fn: always computed; their residual is the indicator
    last_blocks: int = 0  # Bn: always computed after the cached span
    probe: str = "last_first_block"  # or per_block: probe after each of the first blocks, exit at the first hit

    def __post_init__(self):
        super().__post_init__()
        require(self.residual_diff_threshold >= 0, "residual_diff_threshold", self.residual_diff_threshold,
                ">= 0 (0 never caches)")
        require(self.first_blocks >= 1, "first_blocks", self.first_blocks, ">= 1")
        require(self.last_blocks >= 0, "last_blocks", self.last_blocks, ">= 0")
        require(self.probe in PROBES, "probe", self.probe, f"one of {PROBES}")

    @staticmethod
    def search_space(trial, blocks: int) -> dict:
        first = trial.suggest_int("mbcache.first_blocks", 1, max(1, min(8, blocks - 1)))
        last = trial.suggest_int("mbcache.last_blocks", 0, max(0, min(4, blocks - 1 - first)))
        return {"first_blocks": first, "last_blocks": last,
                "residual_diff_threshold": trial.suggest_float("mbcache.residual_diff_threshold", 0.02, 0.6, log=True)}

    def blocks_on_hit(self) -> int:
        return self.first_blocks + self.last_blocks


def _problems(adapter, n_blocks: int, config: MBCacheConfig) -> list[str]:
    found = []
    if config.first_blocks + config.last_blocks >= n_blocks:
        found.append(f"first_blocks={config.first_blocks} + cache.last_blocks={config.last_blocks} leaves no block "
                     f"to cache: this {adapter.architecture} model has {n_blocks} blocks, so Fn + Bn must be < {n_blocks}")
    if adapter.residual_base == "span_input" and config.last_blocks:
        found.append(f"last_blocks={config.last_blocks}: on {adapter.architecture} the cached span must reach the last "
                     "block (its blocks change resolution, so the residual is taken over the whole span); use last_blocks=0")
    return found


def check_mbcache(facts, config: MBCacheConfig) -> list[str]:
    blocks = [] if facts.block_count is None else _problems(facts.adapter, facts.block_count, config)
    return [*blocks, *check_controls(facts, config)]


@register("mbcache", stage="cache", config_cls=MBCacheConfig, traits=cache_traits, check=check_mbcache)
def apply_mbcache(ctx: ApplyContext, config: MBCacheConfig) -> BlockCache:
    """Multi-block cache: compute Fn first and Bn last blocks, cache the span between."""
    adapter = ctx.adapter
    problems = _problems(adapter, len(adapter.blocks(ctx.denoiser)), config)
    if problems:
        raise AccelError(f"cache.{problems[0]}")
    probes = range(config.first_blocks) if config.probe == "per_block" else [config.first_blocks - 1]
    decider = ResidualDiffDecider({p: config.residual_diff_threshold for p in probes},
                                  residual=adapter.residual_base == "probe")
    return BlockCache(ctx, config, decider, last_blocks=config.last_blocks)
