"""The parallel stage: one generation over several processes on torch.distributed.

`parallel=mesh` lays the launched ranks out as cfg × ring × ulysses (their product is the world
size). The sequence dimensions (ring, ulysses) split the denoiser blocks' tokens across ranks
(accel.parallel.sequence) and run attention over the whole sequence (accel.parallel.attention); the
cfg dimension gives each CFG branch its own ranks (accel.parallel.cfg). A cache applied after it takes
its decisions on the whole sequence: the distance's sums are reduced across the ranks that share a
call, then read back once, so every rank decides the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from accel.context import AppliedFacts, ApplyContext
from accel.errors import AccelError, require
from accel.models.attention_route import add_layer
from accel.parallel import mesh as meshes
from accel.registry import STAGES, register

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class MeshConfig:
    strategy: str = "mesh"
    ulysses: int = 1  # ranks splitting attention heads (all-to-all): must divide the model's heads
    ring: int = 1  # ranks passing key/value slices around a ring: any head count
    cfg: int = 1  # ranks per CFG branch split: 2 puts cond and uncond on different ranks
    backend: str = "auto"  # auto: nccl on CUDA GPUs, gloo on CPUs
    timeout_s: float = 600.0  # a collective that waits longer ends the job, naming the rank

    def __post_init__(self):
        for name in ("ulysses", "ring", "cfg"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "a degree >= 1")
        require(self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "> 0 seconds")

    @property
    def degrees(self) -> dict[str, int]:
        return {"cfg": self.cfg, "ring": self.ring, "ulysses": self.ulysses}

    @property
    def world_size(self) -> int:
        return math.prod(self.degrees.values())


def check_mesh(facts, config: MeshConfig) -> list[str]:
    if config.world_size == 1:
        return []
    problems = []
    launched = meshes.launched_world_size()
    if launched != config.world_size:
        problems.append(meshes._world_mismatch(config.degrees, config.world_size, launched).replace("parallel.", ""))
    adapter = facts.adapter
    if config.ring * config.ulysses > 1 and adapter.sequence is None:
        problems.append(f"ulysses={config.ulysses}, ring={config.ring} is not allowed: {adapter.architecture}'s "
                        f"{adapter.denoiser_class} has no sequence parallelism (its convolutions need neighbouring "
                        "tokens); use cfg=2 (CFG parallel) instead")
    denoiser = facts.configs["denoiser"] if facts.configs is not None else None
    if config.ulysses > 1 and denoiser is not None and "num_attention_heads" in denoiser:
        from accel.parallel.sequence import check_heads

        problem = check_heads(denoiser["num_attention_heads"], config.ulysses)
        if problem:
            problems.append(problem)
    attention = facts.stages.get("attention")
    if config.ring * config.ulysses > 1 and attention is not None and attention.strategy == "diffusers":
        problems.append("ulysses/ring are not allowed with attention=diffusers: sharded attention runs through "
                        "torch's SDPA (attention=sdpa or none)")
    if config.cfg > 1 and config.backend == "nccl" and facts.device.type != "cuda":
        problems.append(f"backend='nccl' is not allowed on {facts.device}: NCCL runs on CUDA GPUs (use auto or gloo)")
    return problems


class MeshHandle:
    """What the parallel stage installed, and what a cache asks of it."""

    def __init__(self, config: MeshConfig, mesh: Optional[meshes.Mesh]):
        self.config, self.mesh = config, mesh
        self.shards = None  # SequenceShards
        self.cfg = None  # CFGParallel
        self._cache_group = None
        self._undo: list = []

    # asked by the cache (accel.strategies.block_cache)
    @property
    def relative_l1(self):
        if self._cache_group is None:
            return None
        group = self._cache_group
        if self.shards is not None:
            return lambda now, before: self.shards.relative_l1(now, before, group)
        from accel.parallel.sequence import reduced_relative_l1

        return lambda now, before: reduced_relative_l1(now, before, group)

    @property
    def cfg_branch(self):
        if self.cfg is None or self.cfg.batched:
            return None
        return lambda: self.cfg.branch

    def stats(self) -> dict[str, Any]:
        if self.mesh is None:
            return {"world_size": 1}
        stats = {"world_size": self.config.world_size, "rank": self.mesh.rank, "degrees": self.config.degrees,
                 "backend": torch.distributed.get_backend()}
        if self.shards is not None and self.shards.layout is not None:
            layout = self.shards.layout
            stats["tokens_per_rank"] = {"image": layout.hidden_local, "text": layout.encoder_local}
            stats["padded_tokens"] = layout.padded
        if self.cfg is not None:
            stats.update(self.cfg.stats())
        return stats

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.shards = self.cfg = None


@register("mesh", stage="parallel", config_cls=MeshConfig, check=check_mesh)
def apply_mesh(ctx: ApplyContext, config: MeshConfig) -> MeshHandle:
    """Context parallelism (Ulysses, Ring, both) and CFG parallelism on a torch.distributed device mesh."""
    if config.world_size == 1:
        return MeshHandle(config, None)
    adapter, denoiser = ctx.adapter, ctx.denoiser
    problems = check_mesh(AppliedFacts(ctx), config)
    if problems:
        raise AccelError(f"parallel.{problems[0]}")
    mesh = _mesh(config, ctx.device)
    ctx.mesh = mesh
    handle = MeshHandle(config, mesh)
    try:
        sequence = mesh.sequence
        if sequence is not None:
            from accel.parallel.sequence import SequenceShards, route_layer

            group, size, shard = sequence  # heads against ulysses: checked by check_mesh above
            blocks = adapter.blocks(denoiser)
            handle.shards = SequenceShards(blocks, adapter.sequence, group, size, shard)
            handle._undo.append(handle.shards.remove)
            layer = route_layer(handle.shards, mesh.dimension("ulysses"), mesh.dimension("ring"))
            for block in blocks:
                handle._undo.append(add_layer(block.module, STAGES.index("parallel"), layer))
            handle._cache_group = group
        if config.cfg > 1:
            from accel.parallel.cfg import CFGParallel

            group, size, rank = mesh.dimension("cfg")
            scheduler = ctx.pipe.scheduler
            if not adapter.batched_cfg and not hasattr(scheduler, "step_index"):
                raise AccelError(f"parallel.cfg={config.cfg}: {type(scheduler).__name__} does not count its steps "
                                 "(step_index), which separate-call CFG parallel needs")
            handle.cfg = CFGParallel(ctx.pipe, denoiser, group, size, rank, adapter.batched_cfg,
                                     lambda: ("step", scheduler.step_index))
            handle._undo.append(handle.cfg.remove)
            if adapter.batched_cfg:  # the branches share one call: a cache decides on both, as on one rank
                handle._cache_group = torch.distributed.group.WORLD
    except BaseException:
        handle.remove()
        raise
    return handle


_MESHES: dict[tuple, meshes.Mesh] = {}


def _mesh(config: MeshConfig, device: torch.device) -> meshes.Mesh:
    """One mesh per layout and process: applying a recipe again (compare=true does, every round) reuses it."""
    key = (tuple(config.degrees.items()), str(device))
    if key not in _MESHES or not torch.distributed.is_initialized():
        _MESHES[key] = meshes.build_mesh(config.degrees, config.backend, config.timeout_s, device)
    return _MESHES[key]
