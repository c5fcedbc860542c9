"""The embedded tiny pipelines: local tokenizers that encode any prompt, weights that are a function of the
seed, and a save_pretrained / from_pretrained round trip that generates exactly what the saved pipeline did."""
import inspect

import pytest
import torch
from transformers import AutoTokenizer

from accel.families import FAMILIES
from accel.models.tiny import tokenizers
from tests.helpers import generate

SMALL = dict(num_inference_steps=2, height=32, width=32)
PROMPTS = ["a red fox, 4k", "Ünïcode ✓ 東京 <|endoftext|> tabs\tand  spaces", "", "fox " * 600]


def _state(pipe) -> dict:
    return {f"{name}.{key}": value for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def _into_fresh_memory(pipe) -> None:
    """Copy a loaded pipeline's tensors out of the safetensors memory map. Mapped tensors sit at unaligned
    addresses, where CPU kernels take other vector paths and round differently in the last bit (~1e-7)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()


def small_generate(pipe, **kwargs) -> torch.Tensor:
    """Images (batch, 3, h, w), or frames (batch, frames, 3, h, w) from a video pipeline."""
    if "num_frames" in inspect.signature(pipe.__call__).parameters:
        kwargs.setdefault("num_frames", 5)
    return generate(pipe, **{**SMALL, **kwargs})


def build(name: str, **overrides):
    return FAMILIES[name].build_tiny(**overrides)


@pytest.mark.parametrize("make", [tokenizers.clip_tokenizer, tokenizers.t5_tokenizer])
def test_tokenizers_encode_any_prompt_and_survive_a_save_and_reload(make, tmp_path):
    tokenizer = make()
    tokenizer.save_pretrained(tmp_path)
    reloaded = [type(tokenizer).from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)]
    for prompt in PROMPTS:
        expected = tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids
        assert expected.shape == (1, tokenizer.model_max_length)
        assert 0 <= expected.min() and expected.max() < len(tokenizer)
        for other in reloaded:
            assert torch.equal(other(prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids,
                               expected)


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_same_seed_same_weights_other_seed_other_weights(architecture):
    first, again, other = (_state(build(architecture, seed=s)) for s in (0, 0, 1))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_a_saved_pipeline_loads_back_and_generates_the_same_output(architecture, tmp_path):
    pipe = build(architecture)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    _into_fresh_memory(loaded)
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    loaded_state, state = _state(loaded), _state(pipe)
    assert loaded_state.keys() == state.keys() and all(torch.equal(loaded_state[k], state[k]) for k in state)
    out = small_generate(pipe)
    assert out.shape[0] == 1 and out.shape[-3:] == (3, 32, 32) and torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(small_generate(loaded), out)


@pytest.mark.parametrize("architecture, overrides", [
    ("flux", dict(num_layers=3, num_single_layers=1, attention_head_dim=24, num_attention_heads=3)),
    ("sd3", dict(num_layers=3, attention_head_dim=24, num_attention_heads=3)),
])
def test_denoiser_overrides_apply_and_the_pipeline_still_generates(architecture, overrides):
    pipe = build(architecture, **overrides)
    pipe.set_progress_bar_config(disable=True)
    assert {k: pipe.transformer.config[k] for k in overrides} == overrides
    assert len(pipe.transformer.transformer_blocks) == overrides["num_layers"]
    if architecture == "flux":
        assert len(pipe.transformer.single_transformer_blocks) == overrides["num_single_layers"]
    out = small_generate(pipe)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_sd3_runs_classifier_free_guidance_as_one_batch():
    pipe = build("sd3")
    pipe.set_progress_bar_config(disable=True)
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        out = small_generate(pipe, negative_prompt="blurry", guidance_scale=5.0, num_images_per_prompt=2,
                             height=48, width=64)
    finally:
        hook.remove()
    assert batch_sizes == [4, 4]  # (negative, positive) x 2 images, one call per step
    assert out.shape == (2, 3, 48, 64) and torch.isfinite(out).all()


def test_hunyuan_template_crop_keeps_exactly_the_prompt_after_a_reload(tmp_path):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    build("hunyuan_video").save_pretrained(tmp_path)
    from diffusers import HunyuanVideoPipeline

    loaded = HunyuanVideoPipeline.from_pretrained(tmp_path)
    template, crop = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    tokenizer = loaded.tokenizer
    before_prompt = tokenizer(template.split("{}")[0]).input_ids
    padded = tokenizer(template.format("a red fox"), padding="max_length", max_length=crop + 256).input_ids
    assert len(before_prompt) == crop and padded[:crop] == before_prompt
    assert padded[crop] != tokenizer.pad_token_id and padded[-1] == tokenizer.pad_token_id  # padded on the right
