"""The machinery all block caches share: hooks on a denoiser's blocks that, on a cache hit, skip a
middle span of blocks and put a residual from an earlier full step in their place.

Blocks are indexed 0..N-1 in execution order across the adapter's block lists. Blocks up to the
probe and the last `last_blocks` always run; the span between them is the one a hit skips.
A `Decider` says where to probe (after which blocks, or -1 for the span input) and whether a probe
is close enough to the last full step to reuse it. On a hit at probe p, the blocks after p return
their inputs unchanged and the last block of the span returns H_p + R_p, where R_p is the
residual H_end − H_p saved (or forecast) from full steps.

State lives for one pipeline call (`pipe(...)`), keyed by the order of denoiser calls within a
timestep, so separate-call CFG keeps cond and uncond apart and nothing survives a generation.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from accel import intercept
from accel.context import relative_l1
from accel.errors import AccelError
from accel.models.adapters import BlockAdapter, BoundBlock
from accel.strategies.cache_controls import CacheControls
from accel.strategies.forecast import ResidualForecast

SPAN_INPUT = -1  # a probe taken on the span's input, before block 0 runs


class TimestepReader:
    """Tells which step a denoiser call belongs to: calls of the same step are the CFG branches of it,
    which is how steps and branches are counted. The pipeline's scheduler already knows its step
    index as a Python int; only where it has none is the timestep tensor read, which on a GPU waits
    for the device (by keyword, or by position for UNets)."""

    def __init__(self, denoiser: torch.nn.Module, scheduler=None):
        parameters = list(inspect.signature(denoiser.forward).parameters)
        self.position = parameters.index("timestep") if "timestep" in parameters else None
        self.scheduler = scheduler if hasattr(scheduler, "step_index") else None

    def __call__(self, args: tuple, kwargs: dict):
        if self.scheduler is not None:
            return ("step", self.scheduler.step_index)
        timestep = kwargs.get("timestep")
        if timestep is None and self.position is not None and self.position < len(args):
            timestep = args[self.position]
        return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else timestep


@dataclass
class BranchState:
    """Everything one branch (cond, uncond, ...) keeps across the steps of one generation."""

    residuals: dict[int, tuple[ResidualForecast, Optional[ResidualForecast]]] = field(default_factory=dict)
    decider: dict[str, Any] = field(default_factory=dict)  # the decider's own memory
    consecutive_hits: int = 0
    cached: int = 0
    computed: int = 0
    hit_map: list[str] = field(default_factory=list)
    diffs: list[Optional[float]] = field(default_factory=list)


@dataclass
class CallState:
    """One denoiser call: which branch and step it is, and what its probes saw."""

    branch: BranchState
    step: int
    total_steps: int
    span_input: Optional[tuple] = None
    hit_at: Optional[int] = None
    last_diff: Optional[float] = None
    probed: dict[int, tuple] = field(default_factory=dict)  # probe -> (hidden, encoder) there
    indicators: dict[int, torch.Tensor] = field(default_factory=dict)
    # the distance deciders measure with: over the whole sequence where ranks share it (parallel stage)
    relative_l1: Callable[[torch.Tensor, torch.Tensor], float] = relative_l1


@dataclass
class Generation:
    total_steps: int
    step: int = -1
    last_timestep: Optional[float] = None
    call_in_step: int = 0
    branches: dict[int, BranchState] = field(default_factory=dict)


class Decider(Protocol):
    def probes(self, n_blocks: int) -> list[int]: ...

    def indicator(self, probe: int, call: CallState, hidden: torch.Tensor, block: BoundBlock,
                  args: tuple, kwargs: dict) -> torch.Tensor: ...

    def distance(self, probe: int, indicator: torch.Tensor, call: CallState) -> Optional[float]:
        """Distance from the reference, or None when there is none yet."""

    def passes(self, probe: int, distance: float, call: CallState) -> bool: ...

    def end_call(self, call: CallState, computed: bool) -> None: ...

    def must_compute(self, call: CallState) -> bool:
        """A decider's own reasons to compute this call whatever the probes say."""

    threshold_name: str  # the config field a user tunes
    threshold: float

    def caches_about_half(self, distances: list[float]) -> float:
        """A threshold that would cache about half the steps, from distances seen between full steps."""


class BlockCache:
    """Installs the hooks of one cache on one pipeline; `remove()` takes every one of them off."""

    def __init__(self, ctx, controls: CacheControls, decider: Decider, last_blocks: int = 0):
        adapter: BlockAdapter = ctx.adapter
        if getattr(ctx.pipe, "controlnet", None) is not None:
            # the ControlNet's residuals are added between the blocks inside the denoiser's forward, every
            # step: a hit would add them to the blocks it skips, on top of the residual it reuses
            raise AccelError(f"cache.strategy={controls.strategy!r} is not allowed on {type(ctx.pipe).__name__}: "
                             "its ControlNet adds residuals between the denoiser's blocks, which a cache hit "
                             "skips; run it without a cache (cache=none), or without the ControlNet")
        self.pipe = ctx.pipe
        # what the parallel stage set, if it ran: distances over every rank's tokens, the CFG branch a rank runs
        self.distance = ctx.distance
        self.branch_of_call = ctx.cfg_branch
        self.controls = controls
        self.decider = decider
        self.denoiser = adapter.denoiser(self.pipe)
        self.blocks = adapter.blocks(self.denoiser)
        self.span_end = len(self.blocks) - last_blocks  # blocks [probe+1, span_end) are skipped on a hit
        self.probe_points = decider.probes(len(self.blocks))
        self.order = controls.forecast_order if controls.forecast == "taylor" else 0
        self.from_span_input = adapter.residual_base == "span_input"
        self.timestep = TimestepReader(self.denoiser, getattr(self.pipe, "scheduler", None))
        self.generation: Optional[Generation] = None
        self.call: Optional[CallState] = None
        self.last_generation: Optional[Generation] = None
        self.generations = 0
        self._undo = contextlib.ExitStack()
        self._install()

    # -- installation ---------------------------------------------------------------------------
    def _install(self) -> None:
        self._undo.callback(intercept.around_each(self.pipe, "__call__", "cache", self._generation_scope))
        self._undo.callback(intercept.around(self.denoiser, "forward", "cache", self._denoiser_call))
        for index, block in enumerate(self.blocks):
            self._undo.callback(intercept.around(block.module, "forward", "cache", self._block_layer(index, block)))

    def _block_layer(self, index: int, block: BoundBlock):
        def cached(inner, *args, **kwargs):
            return self._block_forward(index, block, inner, args, kwargs)

        return cached

    def remove(self) -> None:
        self._undo.close()

    # -- per generation and per call ------------------------------------------------------------
    @contextlib.contextmanager
    def _generation_scope(self):
        self.generation = Generation(total_steps=0)  # known once the pipeline has set its timesteps
        try:
            yield
        finally:
            self.last_generation, self.generation, self.call = self.generation, None, None
            self.generations += 1

    def _denoiser_call(self, inner, *args, **kwargs):
        self._begin_call(args, kwargs)
        try:
            return inner(*args, **kwargs)
        finally:
            self._end_call()

    def _begin_call(self, args: tuple, kwargs: dict) -> None:
        gen = self.generation
        if gen is None:  # the denoiser called outside a pipeline call: run it plainly
            self.call = None
            return
        value = self.timestep(args, kwargs)
        if gen.step < 0 or value != gen.last_timestep:
            gen.step, gen.call_in_step = gen.step + 1, 0
        else:
            gen.call_in_step += 1
        gen.last_timestep = value
        if gen.total_steps <= 0:
            timesteps = getattr(self.pipe.scheduler, "timesteps", None)
            gen.total_steps = len(timesteps) if timesteps is not None else 0
        hint = self.branch_of_call() if self.branch_of_call is not None else None
        branch = gen.branches.setdefault(gen.call_in_step if hint is None else hint, BranchState())
        self.call = CallState(branch, gen.step, max(gen.total_steps, gen.step + 1), relative_l1=self.distance)

    def _end_call(self) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        branch, computed = call.branch, call.hit_at is None
        self.decider.end_call(call, computed)
        branch.hit_map.append("C" if computed else "H")
        branch.diffs.append(call.last_diff)
        if computed:
            branch.computed += 1
            branch.consecutive_hits = 0
        else:
            branch.cached += 1
            branch.consecutive_hits += 1

    # -- the blocks -----------------------------------------------------------------------------
    def _block_forward(self, index: int, block: BoundBlock, forward, args: tuple, kwargs: dict):
        call = self.call
        if call is None:
            return forward(*args, **kwargs)
        if index == 0:
            call.span_input = block.inputs(args, kwargs)
            if SPAN_INPUT in self.probe_points:
                self._probe(SPAN_INPUT, call, call.span_input, block, args, kwargs)
        if call.hit_at is not None and index < self.span_end:
            hidden, encoder = block.inputs(args, kwargs)
            if index == self.span_end - 1:
                hidden, encoder = self._apply_residual(call, hidden, encoder)
            return block.io.pack(hidden, encoder)
        out = forward(*args, **kwargs)
        if index in self.probe_points:
            streams = block.io.outputs(out)
            self._probe(index, call, streams, block, args, kwargs)
        if index == self.span_end - 1 and call.hit_at is None:
            self._save_residuals(call, block.io.outputs(out))
        return out

    def _probe(self, probe: int, call: CallState, streams: tuple, block: BoundBlock, args, kwargs) -> None:
        if call.hit_at is not None:
            return
        call.probed[probe] = streams
        indicator = self.decider.indicator(probe, call, streams[0], block, args, kwargs)
        call.indicators[probe] = indicator
        base = call.span_input[0] if self.from_span_input else streams[0]
        if not self._may_hit(probe, call, base):
            return  # no distance either: reading it back (.item()) would stall the device for nothing
        distance = self.decider.distance(probe, indicator, call)
        if distance is None:
            return
        call.last_diff = distance
        if self.decider.passes(probe, distance, call):
            call.hit_at = probe

    def _may_hit(self, probe: int, call: CallState, hidden: torch.Tensor) -> bool:
        c, branch = self.controls, call.branch
        saved = branch.residuals.get(probe)
        return (
            saved is not None
            and saved[0].fits(hidden)
            and c.may_hit(call.step, call.total_steps)
            and (c.max_consecutive_hits < 0 or branch.consecutive_hits < c.max_consecutive_hits)
            and (c.max_cached_steps < 0 or branch.cached < c.max_cached_steps)
            and not self.decider.must_compute(call)
        )

    def _apply_residual(self, call: CallState, hidden: torch.Tensor, encoder):
        hidden_forecast, encoder_forecast = call.branch.residuals[call.hit_at]
        if self.from_span_input:
            hidden = call.span_input[0]
        hidden = hidden + hidden_forecast.predict(call.step)
        # no encoder residual: the span's last block returns no encoder states (SD3's last block)
        encoder = encoder + encoder_forecast.predict(call.step) if encoder_forecast is not None else None
        return hidden, encoder

    def _save_residuals(self, call: CallState, end: tuple) -> None:
        end_hidden, end_encoder = end
        for probe, (hidden, encoder) in call.probed.items():
            if self.from_span_input:
                hidden = call.span_input[0]
            saved = call.branch.residuals.get(probe)
            if saved is None or not saved[0].fits(end_hidden):
                with_encoder = end_encoder is not None and encoder is not None
                saved = (ResidualForecast(self.order), ResidualForecast(self.order) if with_encoder else None)
                call.branch.residuals[probe] = saved
            saved[0].update(call.step, end_hidden - hidden)
            if saved[1] is not None:
                saved[1].update(call.step, end_encoder - encoder)

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        gen = self.generation or self.last_generation
        if gen is None:
            return {"generations": 0}
        branches = [gen.branches[k] for k in sorted(gen.branches)]
        computed = sum(b.computed for b in branches)
        cached = sum(b.cached for b in branches)
        seen = [d for b in branches for d in b.diffs if d is not None]
        threshold = {"name": self.decider.threshold_name, "value": self.decider.threshold,
                     "caches_about_half": round(self.decider.caches_about_half(seen), 5) if seen else None}
        return {
            "generations": self.generations,
            "steps": gen.step + 1,
            "calls": computed + cached,
            "computed": computed,
            "cached": cached,
            "hit_map": ["".join(b.hit_map) for b in branches],
            "diffs": [list(b.diffs) for b in branches],  # exact: a threshold can be set to one of them
            "threshold": threshold,
        }
