"""The parallel stage: one generation over several processes on torch.distributed.

`parallel=mesh` lays the launched ranks out as cfg × ring × ulysses (their product is the world
size). The mesh itself is built once per process by the caller (the job, or `accel.apply`) and handed
in through the apply context. The sequence dimensions (ring, ulysses) split the denoiser blocks' tokens
across ranks (accel.parallel.sequence) and run attention over the whole sequence
(accel.parallel.attention); the cfg dimension gives each CFG branch its own ranks (accel.parallel.cfg).
A cache applied after it takes its decisions on the whole sequence: this stage hands the context the
distance to use (the sums reduced across the ranks that share a call, then read back once, so every
rank decides the same) and the CFG branch of each call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from accel import sdpa_route
from accel.context import AppliedFacts, ApplyContext
from accel.errors import AccelError, require
from accel.parallel import mesh as meshes
from accel.parallel.cfg import CFGParallel
from accel.parallel.sequence import SequenceShards, check_heads, reduced_relative_l1, route_layer
from accel.registry import BYPASSES_TORCH_SDPA, register

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
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
    def sequence_parallel(self) -> bool:
        return self.ring * self.ulysses > 1


def check_mesh(facts, config: MeshConfig) -> list[str]:
    if meshes.world_size(config.degrees) == 1:
        return []
    problems = []
    adapter = facts.adapter
    if config.sequence_parallel and adapter.sequence is None:
        problems.append(f"ulysses={config.ulysses}, ring={config.ring} is not allowed: {adapter.architecture}'s "
                        f"{adapter.denoiser_class} has no sequence parallelism (its convolutions need neighbouring "
                        "tokens); use cfg=2 (CFG parallel) instead")
    denoiser = facts.configs["denoiser"] if facts.configs is not None else None
    heads = denoiser.get("num_attention_heads") if denoiser is not None else None
    if config.ulysses > 1 and adapter.sequence is not None and isinstance(heads, int):
        problem = check_heads(heads, config.ulysses)
        if problem:
            problems.append(problem)
    launch = meshes.launch_problem(config.degrees)  # after what the model says: no launch can fix that
    if launch:
        problems.append(launch.replace("parallel.", ""))
    if config.cfg > 1 and config.backend == "nccl" and facts.device.type != "cuda":
        problems.append(f"backend='nccl' is not allowed on {facts.device}: NCCL runs on CUDA GPUs (use auto or gloo)")
    return problems


def _excludes(config: MeshConfig) -> dict[str, str]:
    if not config.sequence_parallel:
        return {}
    return {BYPASSES_TORCH_SDPA: "sharded attention runs through torch's SDPA (attention=sdpa, accel_triton or none, "
                                 "or attention=diffusers with a native backend)"}


class MeshHandle:
    """What the parallel stage installed on one pipeline."""

    def __init__(self, config: MeshConfig, mesh):
        self.config, self.mesh = config, mesh
        self.shards = None  # SequenceShards
        self.cfg = None  # CFGParallel
        self._undo = contextlib.ExitStack()

    def stats(self) -> dict[str, Any]:
        if self.mesh is None:
            return {"world_size": 1}
        stats = {"world_size": self.mesh.world_size, "rank": self.mesh.rank, "degrees": self.config.degrees,
                 "backend": self.mesh.backend}
        if self.shards is not None and self.shards.layout is not None:
            layout = self.shards.layout
            stats["tokens_per_rank"] = {"image": layout.hidden_local, "text": layout.encoder_local}
            stats["padded_tokens"] = layout.padded
        if self.cfg is not None:
            stats.update(self.cfg.stats())
        return stats

    def remove(self) -> None:
        self._undo.close()
        self.shards = self.cfg = None


@register("mesh", stage="parallel", config_cls=MeshConfig, check=check_mesh, excludes=_excludes)
def apply_mesh(ctx: ApplyContext, config: MeshConfig) -> MeshHandle:
    """Context parallelism (Ulysses, Ring, both) and CFG parallelism on a torch.distributed device mesh."""
    handle = MeshHandle(config, ctx.mesh)
    if meshes.world_size(config.degrees) == 1:
        return handle
    problems = check_mesh(AppliedFacts(ctx), config)
    if problems:
        raise AccelError(f"parallel.{problems[0]}")
    mesh = ctx.mesh
    if mesh is None or mesh.degrees != config.degrees:
        raise AccelError(f"parallel: this recipe needs a {' × '.join(map(str, config.degrees.values()))} mesh "
                         "(cfg × ring × ulysses), and none was handed to apply")
    adapter, denoiser = ctx.adapter, ctx.denoiser
    cache_group = None  # the ranks that share a call, whose distance sums a cache reduces
    try:
        if mesh.sequence is not None:
            group, size, shard = mesh.sequence  # heads against ulysses: checked by check_mesh above
            blocks = adapter.blocks(denoiser)
            handle.shards = SequenceShards(blocks, adapter.sequence, group, size, shard)
            handle._undo.callback(handle.shards.remove)
            layer = route_layer(handle.shards, mesh.dimension("ulysses"), mesh.dimension("ring"))
            for block in blocks:
                handle._undo.callback(sdpa_route.add_layer(block.module, "sequence", layer))
            cache_group = group
        if config.cfg > 1:
            group, size, rank = mesh.dimension("cfg")
            scheduler = ctx.pipe.scheduler
            if not adapter.batched_cfg and not hasattr(scheduler, "step_index"):
                raise AccelError(f"parallel.cfg={config.cfg}: {type(scheduler).__name__} does not count its steps "
                                 "(step_index), which separate-call CFG parallel needs")
            handle.cfg = CFGParallel(ctx.pipe, denoiser, group, size, rank, adapter.batched_cfg,
                                     lambda: ("step", scheduler.step_index))
            handle._undo.callback(handle.cfg.remove)
            if adapter.batched_cfg:  # the branches share one call: a cache decides on both, as on one rank
                cache_group = torch.distributed.group.WORLD
            else:
                cfg = handle.cfg
                ctx.cfg_branch = lambda: cfg.branch
        shards = handle.shards
        if shards is not None:
            ctx.distance = lambda now, before: shards.relative_l1(now, before, cache_group)
        elif cache_group is not None:
            ctx.distance = lambda now, before: reduced_relative_l1(now, before, cache_group)
    except BaseException:
        handle.remove()
        raise
    return handle
