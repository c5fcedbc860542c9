"""The process group and the device mesh a parallel recipe runs on.

torchrun (or the user's own launcher) starts the processes; accel joins the process group they
describe (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment) or uses the one the user already
initialised, and lays the ranks out as a (cfg, ring, ulysses) DeviceMesh: neighbours in the mesh's
last dimension exchange the most (Ulysses' all-to-all every attention), so they are the ranks
closest together (the same node).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from accel.errors import AccelError

DIMENSIONS = ("cfg", "ring", "ulysses")


def launched_world_size() -> int:
    """How many processes the launcher started (1 outside torchrun and without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def backend_for(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Mesh:
    """The ranks of one parallel run: the DeviceMesh and each dimension's group, size and coordinate."""

    device_mesh: "torch.distributed.device_mesh.DeviceMesh"
    degrees: dict[str, int]

    def dimension(self, name: str) -> Optional[tuple[dist.ProcessGroup, int, int]]:
        """(group, size, this rank's index) of a dimension of size > 1, else None."""
        if self.degrees[name] == 1:
            return None
        return self.device_mesh.get_group(name), self.degrees[name], self.device_mesh.get_local_rank(name)

    @property
    def sequence(self) -> Optional[tuple[dist.ProcessGroup, int, int]]:
        """The ranks that share one sequence (ring × ulysses), in shard order: shard = ring·U + ulysses."""
        size = self.degrees["ring"] * self.degrees["ulysses"]
        if size == 1:
            return None
        if self.degrees["ring"] == 1 or self.degrees["ulysses"] == 1:
            return self.dimension("ring" if self.degrees["ring"] > 1 else "ulysses")
        flat = self.device_mesh["ring", "ulysses"]._flatten("sequence")
        return flat.get_group(), size, flat.get_local_rank()

    @property
    def rank(self) -> int:
        return dist.get_rank()



def build_mesh(degrees: dict[str, int], backend: str, timeout_s: float, device: torch.device) -> Mesh:
    """Join (or reuse) the process group and lay it out as a (cfg, ring, ulysses) mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    world = 1
    for size in degrees.values():
        world *= size
    launched = launched_world_size()
    if launched != world:
        raise AccelError(_world_mismatch(degrees, world, launched))
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise AccelError(f"parallel: {world} processes are needed and no process group is set up: start them "
                             f"with `torchrun --nproc_per_node={world} -m accel ...` (or call "
                             "torch.distributed.init_process_group before accel.apply)")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(backend, device), timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        global _owned_group
        _owned_group = True
    mesh = init_device_mesh(device.type, tuple(degrees[d] for d in DIMENSIONS), mesh_dim_names=DIMENSIONS)
    return Mesh(mesh, dict(degrees))


_owned_group = False  # accel started the process group (under torchrun), so accel ends it


def shutdown() -> None:
    """End the process group accel started, if it did (the end of a job); a user's own group stays."""
    global _owned_group
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


def _world_mismatch(degrees: dict[str, int], world: int, launched: int) -> str:
    product = " × ".join(f"parallel.{d}={degrees[d]}" for d in DIMENSIONS)
    return (f"{product} = {world} processes, but {launched} were launched: the degrees' product must equal the "
            f"world size (torchrun --nproc_per_node={world}, or degrees whose product is {launched})")
