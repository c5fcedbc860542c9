"""One adapter per architecture: where a pipeline's denoiser and its blocks are, what a block
takes and returns, and the architecture's indicator for timestep-aware caches.

Caches are written against this interface only; adding a model is one adapter plus one config.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from accel.errors import AccelError


@dataclass(frozen=True)
class BlockIO:
    """How one block class passes the image (hidden) and text (encoder) streams through."""

    hidden_out: Optional[int]  # index of hidden states in the returned tuple; None: returns the tensor
    encoder_out: Optional[int] = None  # index of encoder states in the returned tuple; None: not returned
    n_out: int = 1
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"

    def outputs(self, out) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.hidden_out is None:
            return out, None
        return out[self.hidden_out], (out[self.encoder_out] if self.encoder_out is not None else None)

    def pack(self, hidden: torch.Tensor, encoder: Optional[torch.Tensor]):
        """A block's return value carrying these streams (what a skipped block hands on)."""
        if self.hidden_out is None:
            return hidden
        out: list[Any] = [None] * self.n_out
        out[self.hidden_out] = hidden
        if self.encoder_out is not None:
            out[self.encoder_out] = encoder
        return tuple(out)


@dataclass
class BoundBlock:
    """A block of a loaded model with what is needed to read its inputs quickly."""

    module: nn.Module
    io: BlockIO
    _params: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._params = list(inspect.signature(self.module.forward).parameters)

    def arg(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        position = self._params.index(name) if name in self._params else len(args)
        return args[position] if position < len(args) else None

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        encoder = self.arg(self.io.encoder_arg, args, kwargs) if self.io.encoder_out is not None else None
        return self.arg(self.io.hidden_arg, args, kwargs), encoder


# TeaCache's indicator: the block-0-modulated input (1 + scale) * LN(x) + shift, from the block's
# inputs before it runs.
ModulatedInput = Callable[[nn.Module, BoundBlock, tuple, dict], torch.Tensor]


@dataclass(frozen=True)
class BlockAdapter:
    architecture: str
    pipeline_class: str  # a diffusers pipeline class name
    denoiser_attr: str  # attribute of the pipeline holding the denoiser
    denoiser_class: str
    block_lists: tuple[str, ...]  # attributes of the denoiser holding nn.ModuleLists, in execution order
    block_io: dict[str, BlockIO]  # by block class name
    modulated_input: Optional[ModulatedInput] = None
    # TeaCache's published rescale polynomial (highest order first), where one exists
    teacache_coefficients: Optional[tuple[float, ...]] = None
    weights_hint: str = ""

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def blocks(self, denoiser: nn.Module) -> list[BoundBlock]:
        bound = []
        for attr in self.block_lists:
            for module in getattr(denoiser, attr):
                name = type(module).__name__
                if name not in self.block_io:
                    raise AccelError(f"{self.architecture}: block class {name} in {attr} is not known to the adapter")
                bound.append(BoundBlock(module, self.block_io[name]))
        return bound

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)


def _flux_modulated_input(module, block, args, kwargs):
    hidden = block.arg("hidden_states", args, kwargs)
    return module.norm1(hidden, emb=block.arg("temb", args, kwargs))[0]


_DUAL_ENCODER_FIRST = BlockIO(hidden_out=1, encoder_out=0, n_out=2)

ADAPTERS: dict[str, BlockAdapter] = {
    "flux": BlockAdapter(
        architecture="flux",
        pipeline_class="FluxPipeline",
        denoiser_attr="transformer",
        denoiser_class="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_io={"FluxTransformerBlock": _DUAL_ENCODER_FIRST, "FluxSingleTransformerBlock": _DUAL_ENCODER_FIRST},
        modulated_input=_flux_modulated_input,
        teacache_coefficients=(498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861),
    ),
}


def for_pipeline(pipe) -> BlockAdapter:
    """The adapter whose denoiser class the pipeline holds; an AccelError naming the supported ones if none."""
    for adapter in ADAPTERS.values():
        denoiser = getattr(pipe, adapter.denoiser_attr, None)
        if denoiser is not None and type(denoiser).__name__ == adapter.denoiser_class:
            return adapter
    held = {attr: type(getattr(pipe, attr)).__name__ for attr in ("transformer", "unet") if getattr(pipe, attr, None) is not None}
    supported = ", ".join(f"{a.architecture} ({a.denoiser_class})" for a in ADAPTERS.values())
    raise AccelError(
        f"{type(pipe).__name__} with denoiser {held or 'none'} has no block adapter; supported architectures: {supported}"
    )
