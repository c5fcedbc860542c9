"""Small text encoders and VAEs, with local tokenizers, that several families' tiny pipelines share."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from accel.models.tiny import tokenizers

TEXT_DIM = 32


def tiny_vae(latent_channels: int = 4, blocks: int = 2, **extra) -> AutoencoderKL:
    """A VAE of `blocks` blocks: scale factor 2 ** (blocks - 1)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         block_out_channels=(8, 16, 16, 16)[:blocks], layers_per_block=1, norm_num_groups=4, **extra)


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


def evaluated(pipe):
    """The pipeline with every module in eval mode (what save_pretrained then from_pretrained gives back)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def picture(size: dict, seed: int = 0) -> Image.Image:
    """An input image of the generation's size: a gradient with noise, the same for every run."""
    rng = np.random.default_rng(seed)
    h, w = size["height"], size["width"]
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(np.clip(ramp + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))


def mask(size: dict) -> Image.Image:
    """The right half to repaint."""
    h, w = size["height"], size["width"]
    pixels = np.zeros((h, w), np.uint8)
    pixels[:, w // 2:] = 255
    return Image.fromarray(pixels)
