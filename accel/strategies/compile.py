"""torch.compile of the denoiser, regionally (each block's own computation, as diffusers'
compile_repeated_blocks does) or whole.

With `scope: blocks` the compiled region is each block's own forward, put *below* any cache on the
block (accel.intercept.replace), whatever order the stages were applied in: a cache's decisions
(a distance read back with .item(), a Python branch) stay in eager code between compiled regions, so
every block traces with fullgraph=True and no graph breaks. Blocks of one class share their graphs.

`lora_hotswap_rank: R` prepares the denoiser for peft's LoRA hot-swap (diffusers' `enable_lora_hotswap`):
LoRA weights are padded to rank R and their scalings become tensors, so a LoRA swapped in later with
`pipe.load_lora_weights(file, adapter_name=<loaded name>, hotswap=True)` changes the compiled blocks'
inputs, not their code, and costs no recompile. A LoRA already loaded is prepared now; otherwise the first
one loaded after apply is (that first load adds layers and recompiles once per block class).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

from accel import intercept, resources
from accel.context import AppliedFacts, ApplyContext
from accel.errors import AccelError, require
from accel.registry import DECIDES_BETWEEN_BLOCKS, register

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCOPES = ("blocks", "full")


@dataclass(frozen=True)
class CompileConfig:
    strategy: str = "torch"
    scope: str = "blocks"  # blocks: each block's own forward (regional); full: the whole denoiser
    backend: str = "inductor"
    mode: Optional[str] = None  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    fullgraph: bool = True  # a graph break is an error, not a silent slowdown
    dynamic: Optional[bool] = None  # null: torch decides (static first, dynamic after a shape changes)
    options: dict[str, Any] = field(default_factory=dict)  # backend options (inductor's config), not with mode
    disable: bool = False  # keep the recipe, compile nothing
    lora_hotswap_rank: Optional[int] = None  # the highest LoRA rank to be hot-swapped in without recompiling

    def __post_init__(self):
        require(self.lora_hotswap_rank is None or self.lora_hotswap_rank >= 1, "lora_hotswap_rank",
                self.lora_hotswap_rank, "null or a rank >= 1 (the highest rank of the LoRAs you will swap in)")
        require(self.scope in SCOPES, "scope", self.scope, f"one of {SCOPES}")
        require(self.mode in MODES, "mode", self.mode, f"one of {[m for m in MODES if m]} or null")
        backends = sorted(torch._dynamo.list_backends(exclude_tags=()))
        require(self.backend in backends, "backend", self.backend, f"one of {backends}")
        require(not (self.mode and self.options), "options", self.options,
                "empty when mode is set (torch.compile takes one or the other)")


def check_compile(facts, config: CompileConfig) -> list[str]:
    problems = []
    if config.disable:
        return problems
    cuda = facts.device.type == "cuda"
    if config.backend == "inductor":
        if cuda and importlib.util.find_spec("triton") is None:
            problems.append("backend='inductor' is not allowed here: on a GPU inductor needs the triton package")
        if not cuda and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
            problems.append("backend='inductor' is not allowed here: on the CPU inductor needs a C++ compiler "
                            "(g++ or clang++ on PATH, or CXX); install one or use backend=eager")
    if config.mode == "reduce-overhead" and not cuda:
        problems.append(f"mode='reduce-overhead' is not allowed on {facts.device}: it records CUDA graphs")
    return problems


def _excludes(config: CompileConfig) -> dict[str, str]:
    if config.disable or config.scope != "full":
        return {}
    return {DECIDES_BETWEEN_BLOCKS: "scope='full' compiles the whole denoiser, which traces the cache's decisions "
                                    "(a graph break at every block); use compile.scope=blocks"}


class CompiledDenoiser:
    """The compiled regions of one denoiser, and what compiling them cost, read from dynamo's counters."""

    def __init__(self, ctx: ApplyContext, config: CompileConfig):
        self.config = config
        self.regions = [] if config.disable else self._regions(ctx)
        self.region_classes = len({type(m) for m in self.regions})
        self._start = self._counts()
        options = dict(backend=config.backend, fullgraph=config.fullgraph, dynamic=config.dynamic)
        if config.mode:
            options["mode"] = config.mode
        if config.options:
            options["options"] = dict(config.options)
        self._unprepare = _prepare_lora_hotswap(ctx.denoiser, config.lora_hotswap_rank) if not config.disable else None
        if config.backend == "inductor":
            # inductor's caches survive the process: a later run of the same blocks skips most compile work
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(resources.cache_dir() / "inductor"))
        self._undo = contextlib.ExitStack()
        for module in self.regions:
            self._undo.callback(intercept.replace(module, "forward", lambda own: torch.compile(own, **options)))

    def _regions(self, ctx: ApplyContext) -> list[torch.nn.Module]:
        if self.config.scope == "full":
            return [ctx.denoiser]
        return [block.module for block in ctx.adapter.blocks(ctx.denoiser)]

    @staticmethod
    def _counts() -> tuple[int, int]:
        return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    def stats(self) -> dict[str, Any]:
        if self.config.disable:
            return {"disabled": True}
        graphs, breaks = (now - then for now, then in zip(self._counts(), self._start))
        return {"scope": self.config.scope, "backend": self.config.backend, "regions": len(self.regions),
                "graphs": graphs, "graph_breaks": breaks,
                # a class's first graph is its compile; every further one is a recompile (new shape,
                # new stride, a LoRA that changed the module)
                "recompiles": max(0, graphs - self.region_classes),
                "lora_hotswap_rank": self.config.lora_hotswap_rank}

    def remove(self) -> None:
        self._undo.close()
        if self._unprepare is not None:
            self._unprepare()
            self._unprepare = None


def _prepare_lora_hotswap(denoiser: torch.nn.Module, rank: Optional[int]):
    """Make LoRA swaps on `denoiser` recompile-free up to `rank`; returns what undoes a pending preparation.
    A LoRA already loaded is padded now (peft's prepare_model_for_compiled_hotswap; padding with zeros does
    not change its output); otherwise diffusers pads the first LoRA loaded, and remove() cancels that if
    none came."""
    if rank is None:
        return None
    require(hasattr(denoiser, "enable_lora_hotswap"), "lora_hotswap_rank", rank,
            f"null for {type(denoiser).__name__}: it does not load LoRAs through diffusers' peft integration")
    if getattr(denoiser, "peft_config", None):
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        prepare_model_for_compiled_hotswap(denoiser, target_rank=rank, config=denoiser.peft_config)
        return None
    denoiser.enable_lora_hotswap(target_rank=rank)

    def unprepare():
        denoiser._prepare_lora_hotswap_kwargs = None

    return unprepare


@register("torch", stage="compile", config_cls=CompileConfig, check=check_compile, excludes=_excludes)
def apply_compile(ctx: ApplyContext, config: CompileConfig) -> CompiledDenoiser:
    """torch.compile of each block's own computation (regional), or of the whole denoiser."""
    problems = check_compile(AppliedFacts(ctx), config)
    if problems:
        raise AccelError(f"compile.{problems[0]}")
    return CompiledDenoiser(ctx, config)
