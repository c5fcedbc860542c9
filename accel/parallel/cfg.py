"""CFG parallelism: the cond and uncond branches of classifier-free guidance on different ranks.

Batched CFG (SD3, SDXL: both branches in one call, stacked on the batch): each rank runs its share
of the batch and the outputs are gathered.

Separate-call CFG (FLUX's true CFG, Wan, HunyuanVideo: one denoiser call per branch, cond first):
rank c computes call c of every step. A rank hands back an empty tensor of the right shape for a
call it does not compute, and fills it in place when the step's last call gathers every branch's
output; the pipelines combine the branches only after that last call. The first step runs every
branch on every rank, which is how the output shapes are learnt.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from accel import intercept
from accel.errors import AccelError
from accel.parallel import traffic


@dataclass
class _Step:
    key: Any = None
    calls: int = 0
    placeholders: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    mine: Optional[list[torch.Tensor]] = None


class CFGParallel:
    """Hands each CFG branch of a denoiser to its own rank of `group`."""

    def __init__(self, pipe, denoiser: torch.nn.Module, group: dist.ProcessGroup, size: int, rank: int,
                 batched: bool, step_of: Callable[[], Any]):
        self._learning: dict[int, Any] = {}
        self.group, self.size, self.rank, self.batched = group, size, rank, batched
        self.step_of = step_of
        self.step = _Step()
        self.branch: Optional[int] = None  # the branch of the call running now (separate-call CFG)
        self.shapes: Optional[dict[int, Any]] = None  # per call index: the output's structure and shapes
        self.parallel_steps = 0
        self._undo = contextlib.ExitStack()
        self._undo.callback(intercept.around(denoiser, "forward", "cfg",
                                             self._batched_call if batched else self._separate_call))
        self._undo.callback(intercept.around_each(pipe, "__call__", "cfg", self._generation))

    @contextlib.contextmanager
    def _generation(self):
        self.step, self.shapes, self._learning = _Step(), None, {}
        yield  # on an error the step is left as it is: the error says what went wrong
        self._finish_step()

    # -- batched ----------------------------------------------------------------------------------
    def _batched_call(self, call, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        batch = next((x.shape[0] for x in leaves if torch.is_tensor(x) and x.dim() > 0), None)
        if batch is None or batch % self.size:
            raise AccelError(f"parallel.cfg={self.size} splits the batch of the CFG branches across ranks, but this "
                             f"call has batch {batch}: is classifier-free guidance on (guidance_scale > 1)?")
        share = batch // self.size

        def mine(x):
            if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == batch:
                return x.narrow(0, self.rank * share, share)
            return x

        args, kwargs = tree_unflatten([mine(x) for x in leaves], spec)
        return tree_map(self._gather_batch, call(*args, **kwargs))

    def _gather_batch(self, x):
        if not torch.is_tensor(x):
            return x
        traffic.add("cfg", x, self.size - 1)
        return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), 0, self.group))

    # -- separate calls ---------------------------------------------------------------------------
    def _separate_call(self, call, *args, **kwargs):
        key = self.step_of()
        if key != self.step.key:
            self._finish_step()
            self.step = _Step(key)
        index = self.step.calls
        self.step.calls += 1
        if index >= self.size:
            raise AccelError(f"parallel.cfg={self.size}: the pipeline called the denoiser {index + 1} times in one "
                             f"step; CFG parallel puts one branch per rank, so the degree must equal the calls per step")
        self.branch = index
        try:
            if self.shapes is None:  # the first step: every rank runs every branch and learns the shapes
                out = call(*args, **kwargs)
                self._learn(index, out)
                return out
            if index == self.rank:
                out = call(*args, **kwargs)
                self.step.mine = [x for x in tree_flatten(out)[0] if torch.is_tensor(x)]
            else:
                out = self._placeholder(index)
            if index == self.size - 1:
                self._exchange(out)
            return out
        finally:
            self.branch = None

    def _learn(self, index: int, out) -> None:
        leaves, spec = tree_flatten(out)
        self._learning[index] = (spec, [(x.shape, x.dtype, x.device) if torch.is_tensor(x) else None for x in leaves],
                                 [None if torch.is_tensor(x) else x for x in leaves])

    def _placeholder(self, index: int):
        """Empty tensors shaped like call `index`'s output, to be filled when the step's branches are gathered."""
        spec, tensors, values = self.shapes[index]
        made = [torch.empty(t[0], dtype=t[1], device=t[2]) if t is not None else v for t, v in zip(tensors, values)]
        self.step.placeholders[index] = [x for x in made if torch.is_tensor(x)]
        return tree_unflatten(made, spec)

    def _exchange(self, last_out) -> None:
        """Every branch's output to every rank: fill the placeholders handed back this step."""
        if self.step.mine is None:
            raise AccelError(f"parallel.cfg={self.size}: rank {self.rank} computed no branch this step")
        for position, mine in enumerate(self.step.mine):
            traffic.add("cfg", mine, self.size - 1)
            gathered = funcol.wait_tensor(funcol.all_gather_single(mine.contiguous(), 0, self.group)).chunk(self.size)
            for branch in range(self.size):
                if branch != self.rank:
                    self.step.placeholders[branch][position].copy_(gathered[branch])
        self.parallel_steps += 1

    def _finish_step(self) -> None:
        step = self.step
        if step.key is None:
            return
        if step.calls != self.size:
            raise AccelError(f"parallel.cfg={self.size} needs {self.size} denoiser calls per step (one per CFG "
                             f"branch) but this pipeline made {step.calls}: turn classifier-free guidance on "
                             "(guidance_scale > 1, or true_cfg_scale > 1 with a negative prompt for FLUX), or use "
                             "parallel.cfg=1")
        if self.shapes is None:
            self.shapes, self._learning = self._learning, {}

    def stats(self) -> dict[str, Any]:
        return {"cfg_branch_of_rank": self.rank, "batched": self.batched,
                "parallel_steps": None if self.batched else self.parallel_steps}

    def remove(self) -> None:
        self._undo.close()
