"""The process group and the device mesh a parallel recipe runs on.

torchrun (or the user's own launcher) starts the processes; accel joins the process group they
describe (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment) or uses the one the user already
initialised, and lays the ranks out as a (cfg, ring, ulysses) DeviceMesh: neighbours in the mesh's
last dimension exchange the most (Ulysses' all-to-all every attention), so they are the ranks
closest together (the same node).
"""
from __future__ import annotations

import datetime
import math
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


def under_launcher() -> bool:
    """Whether torchrun (or a launcher like it) started this process, or a process group is already up."""
    return (dist.is_available() and dist.is_initialized()) or {"MASTER_ADDR", "WORLD_SIZE"} <= set(os.environ)


def world_size(degrees: dict[str, int]) -> int:
    """The processes a layout needs: the product of its degrees."""
    return math.prod(degrees.values())


def launch_problem(degrees: dict[str, int]) -> Optional[str]:
    """Why the launched processes do not fit these degrees; None if they do."""
    world, launched = world_size(degrees), launched_world_size()
    if world == launched:
        return None
    product = " × ".join(f"parallel.{d}={degrees[d]}" for d in DIMENSIONS)
    return (f"{product} = {world} processes, but {launched} were launched: the degrees' product must equal the "
            f"world size (torchrun --nproc_per_node={world}, or degrees whose product is {launched})")


def backend_for(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class Mesh:
    """The ranks of one parallel run: the DeviceMesh and each dimension's group, size and coordinate."""

    device_mesh: "torch.distributed.device_mesh.DeviceMesh"
    degrees: dict[str, int]
    owns_group: bool = False  # accel started the process group (under torchrun), so accel ends it

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

    @property
    def world_size(self) -> int:
        return world_size(self.degrees)

    @property
    def backend(self) -> str:
        return dist.get_backend()

    def close(self) -> None:
        """End the process group if accel started it (the end of a job); a user's own group stays."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def join(degrees: dict[str, int], backend: str, timeout_s: float, device: torch.device) -> Optional[Mesh]:
    """Join the process group the launcher describes (or the user's own) and lay it out as a
    (cfg, ring, ulysses) mesh; None for one process started on its own. Under torchrun a 1 × 1 × 1
    layout joins too, so one process goes through the backend's launch path (NCCL on a GPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world_size(degrees)
    if world == 1 and not under_launcher():
        return None
    problem = launch_problem(degrees)
    if problem is not None:
        raise AccelError(problem)
    owns = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise AccelError(f"parallel: {world} processes are needed and no process group is set up: start them "
                             f"with `torchrun --nproc_per_node={world} -m accel ...` (or call "
                             "torch.distributed.init_process_group before accel.apply)")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(backend, device), timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        owns = True
    mesh = init_device_mesh(device.type, tuple(degrees[d] for d in DIMENSIONS), mesh_dim_names=DIMENSIONS)
    return Mesh(mesh, dict(degrees), owns)
