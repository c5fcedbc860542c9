"""A tiny Stable Diffusion 3.5 pipeline with random weights: MMDiT joint blocks, two CLIP text
encoders with projection, a T5 encoder, a 2-block VAE."""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from accel.models.tiny.flux import TEXT_DIM, tiny_clip, tiny_t5, tiny_vae

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
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe
