"""Stable Diffusion 3 and 3.5: SD3Transformer2DModel's joint (MMDiT) blocks, returning (encoder, hidden),
with batched classifier-free guidance. The tiny pipeline: 4 joint blocks, two CLIP text encoders with
projection, a T5 encoder, a 2-block VAE."""
from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from accel.families import Family, Variant, register
from accel.models.adapters import (
    ENCODER_FIRST,
    BlockAdapter,
    SequencePlan,
    SizeRule,
    norm1_modulated_input,
    vae_factor,
)
from accel.models.tiny.parts import (
    TEXT_DIM,
    evaluated,
    picture,
    tiny_clip,
    tiny_t5,
    tiny_vae,
)

# As in the real model (CLIP-L 768 + CLIP-G 1280 against T5's 4096), T5 is twice as wide as the two CLIPs'
# hidden states side by side, which the pipeline zero-pads up to T5's width (and would crop were T5 narrower).
T5_DIM = 4 * TEXT_DIM


def build(seed: int = 0, **transformer_overrides) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    vae = tiny_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    transformer_config = dict(sample_size=32, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                              caption_projection_dim=None, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=96)
    transformer_config.update(transformer_overrides)
    if transformer_config["caption_projection_dim"] is None:  # text tokens join the image tokens' width
        transformer_config["caption_projection_dim"] = (transformer_config["num_attention_heads"]
                                                        * transformer_config["attention_head_dim"])
    transformer = SD3Transformer2DModel(**transformer_config)
    text_encoder, tokenizer = tiny_clip(projection=True)
    text_encoder_2, tokenizer_2 = tiny_clip(projection=True)
    text_encoder_3, tokenizer_3 = tiny_t5(d_model=T5_DIM)
    return evaluated(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3))


def sd3_size(configs) -> SizeRule:
    return SizeRule(vae_factor(configs) * configs["denoiser"].get("patch_size", 2))


FAMILY = register(Family(
    adapter=BlockAdapter(
        architecture="sd3",
        pipeline_class="StableDiffusion3Pipeline",
        denoiser_attr="transformer",
        denoiser_class="SD3Transformer2DModel",
        block_lists=("transformer_blocks",),
        block_io={"JointTransformerBlock": ENCODER_FIRST},
        modulated_input=norm1_modulated_input,
        size_rule=sd3_size,
        published_size=SizeRule(16),
        sequence=SequencePlan(joint="hidden_first"),
        batched_cfg=True,
    ),
    build_tiny=build,
    variants=(Variant("StableDiffusion3Img2ImgPipeline", inputs=lambda pipe, size: {"image": picture(size),
                                                                                     "strength": 0.9}),),
))
