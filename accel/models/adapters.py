"""One adapter per architecture: where a pipeline's denoiser and its blocks are, what a block
takes and returns, and the architecture's indicator for timestep-aware caches.

Caches are written against this interface only; adding a model is one adapter plus one config.
"""
from __future__ import annotations

import inspect
import math
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


def _vae_factor(configs: dict) -> int:
    return 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def _flux_size(configs):  # latents are packed 2×2 into tokens
    return SizeRule(_vae_factor(configs) * 2)


def _sd3_size(configs):
    return SizeRule(_vae_factor(configs) * configs["denoiser"].get("patch_size", 2))


def _hunyuan_size(configs):  # the pipeline asks for multiples of 16 whatever the VAE
    vae, patch = configs["vae"], configs["denoiser"].get("patch_size", 2)
    return SizeRule(math.lcm(16, vae.get("spatial_compression_ratio", 8) * patch),
                    vae.get("temporal_compression_ratio", 4))


def _wan_size(configs):
    vae, patch = configs["vae"], configs["denoiser"].get("patch_size", (1, 2, 2))
    return SizeRule(math.lcm(16, (vae.get("scale_factor_spatial") or 8) * patch[1]),
                    vae.get("scale_factor_temporal") or 4)


def _norm1_modulated_input(module, block, args, kwargs):
    """(1 + scale) * LN(x) + shift from the block's AdaLayerNormZero, as TeaCache probes FLUX, SD3 and HunyuanVideo."""
    hidden = block.arg("hidden_states", args, kwargs)
    return module.norm1(hidden, emb=block.arg("temb", args, kwargs))[0]


def _timestep_embedding(module, block, args, kwargs):
    """Wan's TeaCache probe: the timestep projection every block is modulated with."""
    return block.arg("temb", args, kwargs)


def _wan_coefficients(config) -> Optional[tuple[float, ...]]:
    """Wan 2.1's published coefficients by variant: T2V 1.3B (dim 1536) or 14B (dim 5120); I2V has 36 input channels."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    if config["in_channels"] == 36:
        return None  # I2V coefficients differ by resolution (480P / 720P): set cache.coefficients
    return {5120: (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)}.get(
        dim, (2396.76752, -1311.10545, 201.331979, -8.29855975, 0.137887774))


ENCODER_FIRST = BlockIO(hidden_out=1, encoder_out=0, n_out=2)  # blocks returning (encoder, hidden)
HIDDEN_FIRST = BlockIO(hidden_out=0, encoder_out=1, n_out=2)  # blocks returning (hidden, encoder)
HIDDEN_ONLY = BlockIO(hidden_out=None)  # blocks returning hidden states; text enters by cross-attention
UNET_DOWN = BlockIO(hidden_out=0, n_out=2, fill=())  # (hidden, skip samples for the up blocks)

ADAPTERS: dict[str, BlockAdapter] = {
    "flux": BlockAdapter(
        architecture="flux",
        pipeline_class="FluxPipeline",
        denoiser_attr="transformer",
        denoiser_class="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_io={"FluxTransformerBlock": ENCODER_FIRST, "FluxSingleTransformerBlock": ENCODER_FIRST},
        modulated_input=_norm1_modulated_input,
        teacache_coefficients=lambda config: (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861),
        block_count=lambda config: config["num_layers"] + config["num_single_layers"],
        size_rule=_flux_size,
        published_size=SizeRule(16),
        sequence=SequencePlan(joint="encoder_first", rotary_args=("image_rotary_emb",), rotary_covers="joint"),
    ),
    "sd3": BlockAdapter(
        architecture="sd3",
        pipeline_class="StableDiffusion3Pipeline",
        denoiser_attr="transformer",
        denoiser_class="SD3Transformer2DModel",
        block_lists=("transformer_blocks",),
        block_io={"JointTransformerBlock": ENCODER_FIRST},
        modulated_input=_norm1_modulated_input,
        size_rule=_sd3_size,
        published_size=SizeRule(16),
        sequence=SequencePlan(joint="hidden_first"),
        batched_cfg=True,
    ),
    "hunyuan_video": BlockAdapter(
        architecture="hunyuan_video",
        pipeline_class="HunyuanVideoPipeline",
        denoiser_attr="transformer",
        denoiser_class="HunyuanVideoTransformer3DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_io={"HunyuanVideoTransformerBlock": HIDDEN_FIRST, "HunyuanVideoSingleTransformerBlock": HIDDEN_FIRST},
        modulated_input=_norm1_modulated_input,
        teacache_coefficients=lambda config: (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896),
        block_count=lambda config: config["num_layers"] + config["num_single_layers"],
        size_rule=_hunyuan_size,
        published_size=SizeRule(16, 4),
        video=True,
        sequence=SequencePlan(joint="hidden_first", rotary_args=("freqs_cis", "image_rotary_emb"),
                              mask_arg="attention_mask"),
    ),
    "sdxl": BlockAdapter(
        architecture="sdxl",
        pipeline_class="StableDiffusionXLPipeline",
        denoiser_attr="unet",
        denoiser_class="UNet2DConditionModel",
        block_lists=("down_blocks", "mid_block", "up_blocks"),
        block_io={"DownBlock2D": UNET_DOWN, "CrossAttnDownBlock2D": UNET_DOWN, "UNetMidBlock2DCrossAttn": HIDDEN_ONLY,
                  "UpBlock2D": HIDDEN_ONLY, "CrossAttnUpBlock2D": HIDDEN_ONLY},
        residual_base="span_input",
        published_size=SizeRule(8),
        block_count=lambda config: len(config["down_block_types"]) + 1 + len(config["up_block_types"]),
        batched_cfg=True,  # no sequence plan: a UNet's convolutions need their neighbours; CFG parallel only
    ),
    "wan": BlockAdapter(
        architecture="wan",
        pipeline_class="WanPipeline",
        denoiser_attr="transformer",
        denoiser_class="WanTransformer3DModel",
        block_lists=("blocks",),
        block_io={"WanTransformerBlock": HIDDEN_ONLY},
        modulated_input=_timestep_embedding,
        teacache_coefficients=_wan_coefficients,
        size_rule=_wan_size,
        published_size=SizeRule(16, 4),
        video=True,
        sequence=SequencePlan(joint=None, rotary_args=("rotary_emb",), rotary_dim=1),
    ),
}


def for_pipeline(pipe) -> BlockAdapter:
    """The adapter whose denoiser class (or a subclass, compiled or not) the pipeline holds; an AccelError
    naming the supported ones if none."""
    for adapter in ADAPTERS.values():
        if isinstance(unwrap(getattr(pipe, adapter.denoiser_attr, None)), adapter.denoiser_type()):
            return adapter
    held = {attr: type(unwrap(getattr(pipe, attr))).__name__ for attr in ("transformer", "unet")
            if getattr(pipe, attr, None) is not None}
    supported = ", ".join(f"{a.architecture} ({a.denoiser_class})" for a in ADAPTERS.values())
    raise AccelError(
        f"{type(pipe).__name__} with denoiser {held or 'none'} has no block adapter; supported architectures: {supported}"
    )
