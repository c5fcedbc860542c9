"""FLUX.1 (dev, schnell, Kontext, Fill, and fine-tunes of them): FluxTransformer2DModel's double- then
single-stream blocks, both returning (encoder, hidden), in every FLUX.1 pipeline whose denoiser that is.
The tiny pipeline: 2 double- and 8 single-stream blocks (FLUX's 1:2 proportion, room for cache-dit's
F8B0), a 2-block VAE (scale factor 2), CLIP and T5 with local tokenizers."""
from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
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
    mask,
    picture,
    tiny_clip,
    tiny_t5,
    tiny_vae,
)

# TeaCache's published rescale polynomials (highest order first): FLUX.1, and FLUX.1 Kontext (ComfyUI's)
TEACACHE = {"flux": (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861),
            "flux_kontext": (-1046.55119, 312.563399, -16.9500694, 0.410995971, 0.0374537863)}


def tiny_transformer(**overrides) -> FluxTransformer2DModel:
    config = dict(patch_size=1, in_channels=4 * 4, num_layers=2, num_single_layers=8, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                  axes_dims_rope=None)
    config.update(overrides)
    if config["axes_dims_rope"] is None:  # three rope axes that add up to the head dim
        d = config["attention_head_dim"]
        config["axes_dims_rope"] = (d // 4, d // 4, d - 2 * (d // 4))
    return FluxTransformer2DModel(**config)


def build(seed: int = 0, **transformer_overrides) -> FluxPipeline:
    torch.manual_seed(seed)
    vae = tiny_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = tiny_transformer(**transformer_overrides)
    text_encoder, tokenizer = tiny_clip()
    text_encoder_2, tokenizer_2 = tiny_t5()
    return evaluated(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                  tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                  transformer=transformer))


def fill_transformer(pipe) -> dict:
    """FLUX.1 Fill's denoiser takes the masked image's latents and the mask beside the latents: three
    times the packed latent channels in, a tiny one of its own (seeded)."""
    torch.manual_seed(1)
    packed = pipe.transformer.config.in_channels
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config.update(in_channels=3 * packed, out_channels=packed)
    return {"transformer": FluxTransformer2DModel(**config).eval()}


def flux_size(configs) -> SizeRule:  # latents are packed 2×2 into tokens
    return SizeRule(vae_factor(configs) * 2)


FAMILY = register(Family(
    adapter=BlockAdapter(
        architecture="flux",
        pipeline_class="FluxPipeline",
        denoiser_attr="transformer",
        denoiser_class="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_io={"FluxTransformerBlock": ENCODER_FIRST, "FluxSingleTransformerBlock": ENCODER_FIRST},
        modulated_input=norm1_modulated_input,
        teacache_coefficients=lambda config: TEACACHE["flux"],
        teacache_published=TEACACHE,
        block_count=lambda config: config["num_layers"] + config["num_single_layers"],
        size_rule=flux_size,
        published_size=SizeRule(16),
        sequence=SequencePlan(joint="encoder_first", rotary_args=("image_rotary_emb",), rotary_covers="joint"),
    ),
    build_tiny=build,
    variants=(
        Variant("FluxImg2ImgPipeline", inputs=lambda pipe, size: {"image": picture(size), "strength": 0.9}),
        Variant("FluxInpaintPipeline", inputs=lambda pipe, size: {"image": picture(size), "mask_image": mask(size),
                                                                  "strength": 0.9}),
        # Kontext appends the reference image's tokens to the latents' in every block
        Variant("FluxKontextPipeline", inputs=lambda pipe, size: {"image": picture(size), "_auto_resize": False,
                                                                  "max_area": size["height"] * size["width"]}),
        Variant("FluxFillPipeline", inputs=lambda pipe, size: {"image": picture(size), "mask_image": mask(size)},
                components=fill_transformer),
    ),
    # FLUX.1 runs guidance as two calls per step with a negative prompt (true CFG)
    cfg_call={"negative_prompt": "blurry", "true_cfg_scale": 4.0},
))
