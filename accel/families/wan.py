"""Wan 2.1 text-to-video: WanTransformer3DModel's blocks, which return the hidden states (text enters
by cross-attention, in every block); TeaCache probes the timestep projection every block is modulated
with; guidance as separate calls. The tiny pipeline: 2 blocks, a Wan VAE, a UMT5 text encoder with the
local T5 tokenizer."""
from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5Config, UMT5EncoderModel

from accel.families import Family, register
from accel.models.adapters import HIDDEN_ONLY, BlockAdapter, SequencePlan, SizeRule
from accel.models.tiny import tokenizers
from accel.models.tiny.parts import TEXT_DIM, evaluated


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
    return evaluated(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)))


def timestep_embedding(module, block, args, kwargs):
    """Wan's TeaCache probe: the timestep projection every block is modulated with."""
    return block.arg("temb", args, kwargs)


# TeaCache's published rescale polynomials for Wan 2.1 (highest order first); I2V's differ by resolution
TEACACHE = {
    "wan2.1_t2v_1.3b": (2396.76752, -1311.10545, 201.331979, -8.29855975, 0.137887774),
    "wan2.1_t2v_14b": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "wan2.1_i2v_480p": (-302.331670, 223.948934, -52.5463970, 5.87348440, -0.201973289),
    "wan2.1_i2v_720p": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


def teacache_coefficients(config) -> Optional[tuple[float, ...]]:
    """Wan 2.1's published coefficients by variant: T2V 1.3B (dim 1536) or 14B (dim 5120); I2V (36 input channels)
    has one per resolution, so it takes cache.published=wan2.1_i2v_480p or _720p."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    if config["in_channels"] == 36:
        return None
    return TEACACHE["wan2.1_t2v_14b" if dim == 5120 else "wan2.1_t2v_1.3b"]


def wan_size(configs) -> SizeRule:
    vae, patch = configs["vae"], configs["denoiser"].get("patch_size", (1, 2, 2))
    return SizeRule(math.lcm(16, (vae.get("scale_factor_spatial") or 8) * patch[1]),
                    vae.get("scale_factor_temporal") or 4)


FAMILY = register(Family(
    adapter=BlockAdapter(
        architecture="wan",
        pipeline_class="WanPipeline",
        denoiser_attr="transformer",
        denoiser_class="WanTransformer3DModel",
        block_lists=("blocks",),
        block_io={"WanTransformerBlock": HIDDEN_ONLY},
        modulated_input=timestep_embedding,
        teacache_coefficients=teacache_coefficients,
        teacache_published=TEACACHE,
        size_rule=wan_size,
        published_size=SizeRule(16, 4),
        video=True,
        sequence=SequencePlan(joint=None, rotary_args=("rotary_emb",), rotary_dim=1),
    ),
    build_tiny=build,
    tiny_call={"height": 32, "width": 32, "num_frames": 5},
))
