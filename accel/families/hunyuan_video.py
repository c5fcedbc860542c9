"""HunyuanVideo: HunyuanVideoTransformer3DModel's dual- then single-stream blocks, returning (hidden,
encoder), with a text mask sequence parallelism carries; guidance as separate calls (true CFG) or
embedded. The tiny pipeline: 2 + 2 blocks, a 3D VAE, a Llama text encoder (with a local tokenizer that
knows the pipeline's prompt template) and CLIP."""
from __future__ import annotations

import math
import re

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
    DEFAULT_PROMPT_TEMPLATE,
)
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from accel.families import Family, register
from accel.models.adapters import (
    HIDDEN_FIRST,
    BlockAdapter,
    SequencePlan,
    SizeRule,
    norm1_modulated_input,
)
from accel.models.tiny import tokenizers
from accel.models.tiny.parts import TEXT_DIM, evaluated, tiny_clip


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Even (frames, height, width) rope dims that add up to the head dim, in HunyuanVideo's 16:56:56
    proportion: (2, 4, 4) for 10, (16, 56, 56) for 128."""
    spatial = head_dim * 7 // 16 // 2 * 2
    return head_dim - 2 * spatial, spatial, spatial


def template_tokenizer() -> PreTrainedTokenizerFast:
    """The Llama tokenizer, padding on the right, wrapped in the generic fast class.

    The pipeline pads to max_length and then drops the first `crop_start` (95) tokens, the template:
    that only lands on the prompt with right padding, and with the template's words whole and its
    punctuation apart, which puts exactly 95 tokens before the prompt, as the real vocabulary does.
    The generic class reloads tokenizer.json as saved; LlamaTokenizerFast.from_pretrained would rebuild
    the backend as a BPE from the vocabulary and tokenize the template differently."""
    template_text = re.sub(r"<\|[a-z_]+\|>|\{\}", " ", DEFAULT_PROMPT_TEMPLATE["template"])
    llama = tokenizers.llama_tokenizer(" ".join(word.strip(".:,") for word in template_text.split()))
    return PreTrainedTokenizerFast(tokenizer_object=llama.backend_tokenizer, bos_token=llama.bos_token,
                                   eos_token=llama.eos_token, pad_token=llama.pad_token, unk_token=llama.unk_token,
                                   model_max_length=llama.model_max_length, padding_side="right")


def build(seed: int = 0, **transformer_overrides) -> HunyuanVideoPipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)
    transformer_config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                              num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
                              guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                              rope_axes_dim=None)
    transformer_config.update(transformer_overrides)
    if transformer_config["rope_axes_dim"] is None:
        transformer_config["rope_axes_dim"] = rope_axes(transformer_config["attention_head_dim"])
    transformer = HunyuanVideoTransformer3DModel(**transformer_config)
    tokenizer = template_tokenizer()
    text_encoder = LlamaModel(LlamaConfig(
        hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3,
        vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2, tokenizer_2 = tiny_clip()
    return evaluated(HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                          vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2))


TEACACHE = {"hunyuan_video": (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896)}


def hunyuan_size(configs) -> SizeRule:  # the pipeline asks for multiples of 16 whatever the VAE
    vae, patch = configs["vae"], configs["denoiser"].get("patch_size", 2)
    return SizeRule(math.lcm(16, vae.get("spatial_compression_ratio", 8) * patch),
                    vae.get("temporal_compression_ratio", 4))


FAMILY = register(Family(
    adapter=BlockAdapter(
        architecture="hunyuan_video",
        pipeline_class="HunyuanVideoPipeline",
        denoiser_attr="transformer",
        denoiser_class="HunyuanVideoTransformer3DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        block_io={"HunyuanVideoTransformerBlock": HIDDEN_FIRST, "HunyuanVideoSingleTransformerBlock": HIDDEN_FIRST},
        modulated_input=norm1_modulated_input,
        teacache_coefficients=lambda config: TEACACHE["hunyuan_video"],
        teacache_published=TEACACHE,
        block_count=lambda config: config["num_layers"] + config["num_single_layers"],
        size_rule=hunyuan_size,
        published_size=SizeRule(16, 4),
        video=True,
        sequence=SequencePlan(joint="hidden_first", rotary_args=("freqs_cis", "image_rotary_emb"),
                              mask_arg="attention_mask"),
    ),
    build_tiny=build,
    tiny_call={"height": 32, "width": 32, "num_frames": 5},
    cfg_call={"negative_prompt": "blurry", "true_cfg_scale": 4.0},
))
