"""TeaCache: probe the timestep-modulated input of block 0, rescale its relative L1 change through a
per-model polynomial, and accumulate it; while the sum stays under `rel_l1_threshold` reuse the whole
stack's residual from the last full step. A full step resets the sum; first and last steps always
compute. Coefficients: the model's published ones, or your own from `python -m accel.calibrate`."""
from __future__ import annotations

import statistics
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from accel.errors import AccelError, require
from accel.models.adapters import BlockAdapter
from accel.context import ApplyContext
from accel.registry import register
from accel.strategies.block_cache import SPAN_INPUT, BlockCache, CallState
from accel.strategies.cache_controls import CacheControls, cache_traits, check_controls


ORDER = 4  # TeaCache's rescale polynomials are of order 4


class ModulatedInputDecider:
    def __init__(self, adapter: BlockAdapter, threshold: float, coefficients: list[float]):
        self.adapter = adapter
        self.threshold = threshold
        self.rescale = np.poly1d(coefficients)

    def probes(self, n_blocks: int) -> list[int]:
        return [SPAN_INPUT]

    def indicator(self, probe, call: CallState, hidden, block, args, kwargs) -> torch.Tensor:
        return self.adapter.modulated_input(block.module, block, args, kwargs)

    def distance(self, probe: int, indicator: torch.Tensor, call: CallState) -> Optional[float]:
        previous = call.branch.decider.get("previous")
        if previous is None or previous.shape != indicator.shape:
            return None
        return call.relative_l1(indicator, previous)

    def passes(self, probe: int, distance: float, call: CallState) -> bool:
        accumulated = call.branch.decider.get("accumulated", 0.0) + abs(float(self.rescale(distance)))
        call.branch.decider["accumulated"] = accumulated
        return accumulated < self.threshold

    def end_call(self, call: CallState, computed: bool) -> None:
        memory = call.branch.decider
        memory["previous"] = call.indicators.get(SPAN_INPUT)  # TeaCache compares consecutive steps
        if computed:
            memory["accumulated"] = 0.0

    def must_compute(self, call: CallState) -> bool:
        return call.step >= call.total_steps - 1

    threshold_name = "rel_l1_threshold"

    def caches_about_half(self, distances: list[float]) -> float:
        """One rescaled step passes and two do not: hit, compute, hit, compute …"""
        return 1.5 * statistics.median(abs(float(self.rescale(d))) for d in distances)


@dataclass(frozen=True)
class TeaCacheConfig(CacheControls):
    strategy: str = "teacache"
    rel_l1_threshold: float = 0.4  # 0: never cache. FLUX published: 0.25 -> 1.5x, 0.4 -> 1.8x, 0.6 -> 2.0x
    coefficients: Optional[list[float]] = None  # rescale polynomial, highest order first; null: the model's published
    published: Optional[str] = None  # a published polynomial by name (python -m accel.list); null: the family's default
    fitted_on: Optional[str] = None  # the architecture accel.calibrate fitted `coefficients` on

    def __post_init__(self):
        super().__post_init__()
        require(self.rel_l1_threshold >= 0, "rel_l1_threshold", self.rel_l1_threshold, ">= 0 (0 never caches)")
        require(self.coefficients is None or len(self.coefficients) == ORDER + 1, "coefficients", self.coefficients,
                f"null (the model's published ones) or the {ORDER + 1} coefficients of an order-{ORDER} polynomial, "
                "highest order first, as TeaCache publishes and accel.calibrate fits them")
        require(self.coefficients is None or self.published is None, "published", self.published,
                "null when coefficients are given (the one or the other)")

    @staticmethod
    def search_space(trial, blocks: int) -> dict:
        return {"rel_l1_threshold": trial.suggest_float("teacache.rel_l1_threshold", 0.1, 2.0, log=True)}

    def blocks_on_hit(self) -> int:
        return 0  # its probe is block 0's input modulation alone

    def last_step_computes(self) -> bool:
        return True


def _coefficients(adapter, denoiser_config, config: TeaCacheConfig) -> tuple[Optional[list[float]], list[str]]:
    """The coefficients to use, and what makes TeaCache unusable on this model."""
    if adapter.modulated_input is None:
        return None, [f"strategy=teacache needs a modulated-input probe, which the {adapter.architecture} adapter lacks"]
    coefficients = config.coefficients
    if config.published is not None:
        named = adapter.teacache_published
        if config.published not in named:
            return None, [f"published={config.published!r} is not a polynomial TeaCache publishes for "
                          f"{adapter.architecture}: " + (f"one of {', '.join(sorted(named))}" if named else
                                                         "it publishes none; fit one with python -m accel.calibrate")]
        coefficients = named[config.published]
    if coefficients is None and adapter.teacache_coefficients is not None:
        coefficients = adapter.teacache_coefficients(denoiser_config)
    if coefficients is None:
        return None, [f"coefficients=null but this {adapter.architecture} model has no published TeaCache coefficients: "
                      "fit them with `python -m accel.calibrate recipe=...` and set cache.coefficients"]
    return list(coefficients), []


def check_teacache(facts, config: TeaCacheConfig) -> list[str]:
    if facts.configs is None:  # the default polynomial depends on the denoiser's config: only a name is checked here
        own = _coefficients(facts.adapter, None, config)[1] if facts.adapter.modulated_input is None or \
            config.published is not None else []
    else:
        own = _coefficients(facts.adapter, facts.configs["denoiser"], config)[1]
    return [*own, *check_controls(facts, config)]


@register("teacache", stage="cache", config_cls=TeaCacheConfig, traits=cache_traits, check=check_teacache)
def apply_teacache(ctx: ApplyContext, config: TeaCacheConfig) -> BlockCache:
    """TeaCache: accumulate the rescaled change of block 0's modulated input; skip every block while under the threshold."""
    adapter = ctx.adapter
    coefficients, problems = _coefficients(adapter, ctx.denoiser.config, config)
    if problems:
        raise AccelError(f"cache.{problems[0]}")
    if config.fitted_on not in (None, adapter.architecture):
        logging.getLogger("accel").warning(
            f"accel: warning: cache.coefficients were fitted on {config.fitted_on} (cache.fitted_on) but this is a "
            f"{adapter.architecture} model: its probe changes differently, so the threshold will not mean the same; "
            "calibrate on this model with `python -m accel.calibrate`")
    decider = ModulatedInputDecider(adapter, config.rel_l1_threshold, coefficients)
    return BlockCache(ctx, config, decider)
