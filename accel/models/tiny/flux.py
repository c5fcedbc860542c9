"""A tiny FLUX.1 pipeline with random weights: both double- and single-stream blocks, a 2-block VAE
(scale factor 2), CLIP and T5 text encoders with local tokenizers."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from accel.models.tiny import tokenizers

TEXT_DIM = 32


def tiny_vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, **extra)


def tiny_clip(projection: bool = False):
    clip = tokenizers.clip_tokenizer()
    config = CLIPTextConfig(hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                            projection_dim=TEXT_DIM, vocab_size=tokenizers.CLIP_VOCAB_SIZE, max_position_embeddings=77,
                            bos_token_id=clip.bos_token_id, eos_token_id=clip.eos_token_id, pad_token_id=clip.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config), clip


def tiny_t5(d_model: int = TEXT_DIM):
    t5 = tokenizers.t5_tokenizer()
    config = T5Config(d_model=d_model, d_ff=64, d_kv=16, num_heads=2, num_layers=2, vocab_size=tokenizers.T5_VOCAB_SIZE,
                      pad_token_id=t5.pad_token_id, eos_token_id=t5.eos_token_id, decoder_start_token_id=t5.pad_token_id)
    return T5EncoderModel(config), t5


def build(seed: int = 0, **transformer_overrides) -> FluxPipeline:
    torch.manual_seed(seed)
    vae = tiny_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    # 2 double- and 8 single-stream blocks: FLUX's 1:2 proportion, and room for cache-dit's F8B0 default
    transformer_config = dict(patch_size=1, in_channels=4 * 4, num_layers=2, num_single_layers=8, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                              axes_dims_rope=None)
    transformer_config.update(transformer_overrides)
    if transformer_config["axes_dims_rope"] is None:  # three rope axes that add up to the head dim
        d = transformer_config["attention_head_dim"]
        transformer_config["axes_dims_rope"] = (d // 4, d // 4, d - 2 * (d // 4))
    transformer = FluxTransformer2DModel(**transformer_config)
    text_encoder, tokenizer = tiny_clip()
    text_encoder_2, tokenizer_2 = tiny_t5()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe
