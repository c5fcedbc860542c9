"""Stable Diffusion XL and its fine-tunes (Pony, Illustrious, ... are SDXL architecture): a
UNet2DConditionModel whose first down block is the probe and everything after it, skip connections
included, the cached span (its blocks change resolution, as WaveSpeed caches UNets); batched CFG.
The tiny pipeline: a UNet with plain and cross-attention down/up blocks and SDXL's text-time
conditioning, two CLIP text encoders (the second with projection), a 2-block VAE."""
from __future__ import annotations

import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from accel.families import Family, Variant, register
from accel.models.adapters import HIDDEN_ONLY, UNET_DOWN, BlockAdapter, SizeRule
from accel.models.tiny.parts import (
    TEXT_DIM,
    evaluated,
    mask,
    picture,
    tiny_clip,
    tiny_vae,
)

TIME_EMBED_DIM = 8


def build(seed: int = 0, **unet_overrides) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    vae = tiny_vae(latent_channels=4, scaling_factor=0.13025)
    unet_config = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        # six micro-conditioning numbers (sizes, crop) embedded, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,
        cross_attention_dim=2 * TEXT_DIM, norm_num_groups=8,
    )
    unet_config.update(unet_overrides)
    unet = UNet2DConditionModel(**unet_config)
    text_encoder, tokenizer = tiny_clip()
    text_encoder_2, tokenizer_2 = tiny_clip(projection=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return evaluated(StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                               scheduler=scheduler))


UNET_BLOCKS = {"DownBlock2D": UNET_DOWN, "CrossAttnDownBlock2D": UNET_DOWN, "UNetMidBlock2DCrossAttn": HIDDEN_ONLY,
               "UpBlock2D": HIDDEN_ONLY, "CrossAttnUpBlock2D": HIDDEN_ONLY}


def unet_adapter(architecture: str, pipeline_class: str) -> BlockAdapter:
    """What the SD-family UNets share: their blocks and the span a cache skips (SD1.5 uses it too)."""
    return BlockAdapter(
        architecture=architecture,
        pipeline_class=pipeline_class,
        denoiser_attr="unet",
        denoiser_class="UNet2DConditionModel",
        block_lists=("down_blocks", "mid_block", "up_blocks"),
        block_io=UNET_BLOCKS,
        residual_base="span_input",
        published_size=SizeRule(8),
        block_count=lambda config: len(config["down_block_types"]) + 1 + len(config["up_block_types"]),
        batched_cfg=True,  # no sequence plan: a UNet's convolutions need their neighbours; CFG parallel only
    )


FAMILY = register(Family(
    adapter=unet_adapter("sdxl", "StableDiffusionXLPipeline"),
    build_tiny=build,
    variants=(
        Variant("StableDiffusionXLImg2ImgPipeline", inputs=lambda pipe, size: {"image": picture(size),
                                                                                "strength": 0.9}),
        Variant("StableDiffusionXLInpaintPipeline", inputs=lambda pipe, size: {"image": picture(size),
                                                                                "mask_image": mask(size),
                                                                                "strength": 0.9}),
    ),
))
