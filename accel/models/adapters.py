"""What a family declares of its denoiser (accel.families): where a pipeline's denoiser and its
blocks are, what a block takes and returns, the indicator timestep-aware caches probe, how sequence
parallelism splits its tokens, and the sizes it makes. Caches are written against this interface only.
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
    fill: Any = None  # what a skipped block returns in its other output slots (UNet down blocks: no skip samples)

    def outputs(self, out) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.hidden_out is None:
            return out, None
        return out[self.hidden_out], (out[self.encoder_out] if self.encoder_out is not None else None)

    def pack(self, hidden: torch.Tensor, encoder: Optional[torch.Tensor]):
        """A block's return value carrying these streams (what a skipped block hands on)."""
        if self.hidden_out is None:
            return hidden
        out: list[Any] = [self.fill] * self.n_out
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


@dataclass(frozen=True)
class SequencePlan:
    """What sequence parallelism needs to know of an architecture's blocks (accel.parallel.sequence)."""

    # how a block's attention lines up the streams: "encoder_first" / "hidden_first" (joint attention
    # over text and image tokens), or None (self-attention over image tokens, cross-attention to text)
    joint: Optional[str]
    rotary_args: tuple[str, ...] = ()  # the block arguments carrying rotary embeddings (names differ by block class)
    rotary_covers: str = "hidden"  # "hidden": image tokens only; "joint": text then image tokens
    rotary_dim: int = 0  # the token dimension of the rotary tensors
    mask_arg: Optional[str] = None  # a key mask over (image, text) tokens the blocks take (HunyuanVideo)


# TeaCache's indicator: the block-0-modulated input (1 + scale) * LN(x) + shift, from the block's
# inputs before it runs.
ModulatedInput = Callable[[nn.Module, BoundBlock, tuple, dict], torch.Tensor]


@dataclass(frozen=True)
class BlockAdapter:
    architecture: str
    pipeline_class: str  # a diffusers pipeline class name
    denoiser_attr: str  # attribute of the pipeline holding the denoiser
    denoiser_class: str
    block_lists: tuple[str, ...]  # attributes of the denoiser holding blocks (ModuleLists or one block), in execution order
    block_io: dict[str, BlockIO]  # by block class name
    # What a cached residual is measured from. "probe": the output of the probe block, which every DiT
    # block hands on unchanged in shape. "span_input": the input of block 0, because a UNet's blocks
    # change resolution and only the span's input matches the last up block's output in shape; the
    # probe is then compared by its output, as WaveSpeed does for UNets.
    residual_base: str = "probe"
    modulated_input: Optional[ModulatedInput] = None
    # TeaCache's published rescale polynomial (highest order first) for a given denoiser, where one exists
    # (from the denoiser's config, a mapping, so the doctor can ask before any weights load)
    teacache_coefficients: Optional[Callable[[Any], Optional[tuple[float, ...]]]] = None
    # every rescale polynomial TeaCache publishes for this family, by name (cache.published=NAME)
    teacache_published: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # how many blocks the denoiser of a given config has (the doctor checks Fn + Bn against it)
    block_count: Callable[[Any], int] = lambda config: config["num_layers"]
    # What heights and widths (multiples of `spatial`) and, for video, frame counts (t·k + 1) the
    # pipeline generates exactly, from its components' configs ({"vae": {...}, "denoiser": {...}})
    size_rule: Callable[[dict[str, dict]], "SizeRule"] = lambda configs: SizeRule(8)
    # the sizes the published models of this architecture make, for when their files are not here
    published_size: "SizeRule" = None
    video: bool = False
    # how sequence parallelism splits the blocks' tokens; None: the architecture is not sequence-parallel
    sequence: Optional[SequencePlan] = None
    batched_cfg: bool = False  # CFG runs both branches in one call, batched (else one call per branch)

    def denoiser(self, pipe) -> nn.Module:
        """The real denoiser module (unwrapped from torch.compile), which hooks must go on."""
        return unwrap(getattr(pipe, self.denoiser_attr))

    def denoiser_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def blocks(self, denoiser: nn.Module) -> list[BoundBlock]:
        bound = []
        for attr in self.block_lists:
            held = getattr(denoiser, attr)
            for module in held if isinstance(held, nn.ModuleList) else [held]:
                name = type(module).__name__
                if name not in self.block_io:
                    raise AccelError(f"{self.architecture}: block class {name} in {attr} is not known to the adapter")
                bound.append(BoundBlock(module, self.block_io[name]))
        return bound

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)


def unwrap(module):
    """The module behind a `torch.compile(module)` wrapper (an OptimizedModule keeps it at `_orig_mod`)."""
    return getattr(module, "_orig_mod", module)


@dataclass(frozen=True)
class SizeRule:
    spatial: int  # height and width must be multiples of this
    temporal: Optional[int] = None  # video: num_frames - 1 must be a multiple of this

    def problems(self, height: int, width: int, num_frames: Optional[int]) -> list[tuple[str, int, str]]:
        """(field, value, what is allowed) for each size this rule refuses."""
        found = []
        for name, value in (("height", height), ("width", width)):
            if value % self.spatial:
                low = value - value % self.spatial
                found.append((name, value, f"a multiple of {self.spatial} for this model, e.g. "
                                           f"{max(low, self.spatial)} or {low + self.spatial}"))
        if self.temporal and num_frames is not None and (num_frames - 1) % self.temporal:
            low = num_frames - (num_frames - 1) % self.temporal
            found.append(("num_frames", num_frames, f"{self.temporal}·k + 1 for this model, e.g. {low} or "
                                                   f"{low + self.temporal}"))
        return found


def vae_factor(configs: dict) -> int:
    """How much a 2D VAE of this config downsamples: 2 per block after the first."""
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def norm1_modulated_input(module, block, args, kwargs):
    """(1 + scale) * LN(x) + shift from the block's AdaLayerNormZero, as TeaCache probes FLUX, SD3 and HunyuanVideo."""
    hidden = block.arg("hidden_states", args, kwargs)
    return module.norm1(hidden, emb=block.arg("temb", args, kwargs))[0]


ENCODER_FIRST = BlockIO(hidden_out=1, encoder_out=0, n_out=2)  # blocks returning (encoder, hidden)
HIDDEN_FIRST = BlockIO(hidden_out=0, encoder_out=1, n_out=2)  # blocks returning (hidden, encoder)
HIDDEN_ONLY = BlockIO(hidden_out=None)  # blocks returning hidden states; text enters by cross-attention
UNET_DOWN = BlockIO(hidden_out=0, n_out=2, fill=())  # (hidden, skip samples for the up blocks)
