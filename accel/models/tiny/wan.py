"""A tiny Wan 2.1 text-to-video pipeline with random weights: WanTransformer3DModel, a Wan VAE,
a UMT5 text encoder with the local T5 tokenizer."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from accel.models.tiny import tokenizers
from accel.models.tiny.flux import TEXT_DIM


def build(seed: int = 0, **transformer_overrides) -> WanPipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer_config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                              out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    transformer_config.update(transformer_overrides)
    transformer = WanTransformer3DModel(**transformer_config)
    tokenizer = tokenizers.t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(d_model=TEXT_DIM, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                                               vocab_size=tokenizers.T5_VOCAB_SIZE, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               decoder_start_token_id=tokenizer.pad_token_id))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe
