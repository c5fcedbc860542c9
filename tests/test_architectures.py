"""The cache guarantees on every supported architecture, each on its embedded tiny pipeline:
off equals baseline, no state survives a generation, CFG branches stay apart, remove() restores,
LoRAs loaded before or after still take effect, stochastic schedulers still work."""
import inspect

import pytest
import torch

import accel
from accel.context import ApplyContext
from accel.models.adapters import for_pipeline
from accel.strategies.fbcache import FBCacheConfig, apply_fbcache
from tests.helpers import IDENTITY, generate, tiny_pipeline

MODELS = ["flux_tiny", "sd35_tiny", "sdxl_tiny", "wan_tiny", "hunyuan_video_tiny"]
VIDEO = dict(height=32, width=32, num_frames=5)
ALWAYS = 1e9
OFF = {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}}
CACHING = {"cache": {"strategy": "fbcache", "residual_diff_threshold": ALWAYS, "max_consecutive_hits": 1}}
CFG_CALLS = {  # a generation that runs classifier-free guidance, and how the pipeline runs it
    "flux_tiny": dict(negative_prompt="blurry", true_cfg_scale=4.0),  # two denoiser calls per step
    "sd35_tiny": dict(guidance_scale=5.0),  # one call on a batch of (uncond, cond)
    "sdxl_tiny": dict(guidance_scale=5.0),
    "wan_tiny": dict(VIDEO, guidance_scale=5.0),  # two denoiser calls per step
    "hunyuan_video_tiny": dict(VIDEO, negative_prompt="blurry", true_cfg_scale=4.0),  # two calls per step
}
SEPARATE_CALL_CFG = {"flux_tiny", "wan_tiny", "hunyuan_video_tiny"}


def video_call(name: str) -> dict:
    return VIDEO if name in ("wan_tiny", "hunyuan_video_tiny") else {}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    pipe = tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def run(name, pipe, **kwargs):
    return generate(pipe, **{**video_call(name), **kwargs})


def test_off_equals_baseline_and_remove_restores(model):
    name, pipe = model
    baseline = run(name, pipe)
    with accel.apply(pipe, OFF) as applied:
        assert torch.equal(run(name, pipe), baseline)
        assert applied.stats()["cache"]["cached"] == 0
    with accel.apply(pipe, CACHING):
        assert not torch.equal(run(name, pipe), baseline)
    assert torch.equal(run(name, pipe), baseline)


def test_no_state_survives_a_change_of_resolution_batch_or_steps(model):
    name, pipe = model
    batch = "num_videos_per_prompt" if video_call(name) else "num_images_per_prompt"
    calls = [dict(seed=1), dict(seed=2, height=32, width=48, num_inference_steps=5),
             {"seed": 1, batch: 2, "num_inference_steps": 6}]
    with accel.apply(pipe, CACHING):
        together = [run(name, pipe, **c) for c in calls]
    for call, out in zip(calls, together):
        with accel.apply(pipe, CACHING):
            assert torch.equal(run(name, pipe, **call), out)


def test_wrapped_blocks_keep_their_signature_so_a_later_binding_finds_positional_args(model):
    """A second cache (or a calibration) binds blocks another cache already wrapped and reads their
    arguments by the forward's signature; Wan's blocks, for one, take theirs by position."""
    name, pipe = model
    adapter = for_pipeline(pipe)
    signatures = [inspect.signature(b.module.forward) for b in adapter.blocks(adapter.denoiser(pipe))]
    with accel.apply(pipe, OFF):
        for block, signature in zip(adapter.blocks(adapter.denoiser(pipe)), signatures):
            assert "forward" in block.module.__dict__  # bound over the wrapper
            assert inspect.signature(block.module.forward) == signature
            names = list(signature.parameters)
            args = tuple(object() for _ in names)  # every argument passed by position
            hidden, encoder = block.inputs(args, {})
            assert hidden is args[names.index(block.io.hidden_arg)]
            if block.io.encoder_out is not None:
                assert encoder is args[names.index(block.io.encoder_arg)]


def test_a_second_cache_over_wrapped_blocks_runs_exactly(model):
    name, pipe = model
    baseline = run(name, pipe)
    ctx = ApplyContext(pipe, pipe.device)
    first = apply_fbcache(ctx, FBCacheConfig(residual_diff_threshold=0.0))
    try:
        second = apply_fbcache(ctx, FBCacheConfig(residual_diff_threshold=0.0))
        try:
            assert torch.equal(run(name, pipe), baseline)
            assert second.stats()["computed"] > 0 and second.stats()["cached"] == 0
        finally:
            second.remove()
    finally:
        first.remove()
    assert torch.equal(run(name, pipe), baseline)


def _record_span(pipe, adapter):
    """Per denoiser call: the (hidden, encoder) streams a residual is measured from, and those leaving
    the last block (encoder None where a block does not return it)."""
    blocks = adapter.blocks(adapter.denoiser(pipe))
    first, last, base, end = blocks[0], blocks[-1], [], []

    def clone(streams):
        return tuple(None if s is None else s.clone() for s in streams)

    def before_first(module, args, kwargs):
        if adapter.residual_base == "span_input":
            base.append(clone(first.inputs(args, kwargs)))

    def after_first(module, args, kwargs, output):
        if adapter.residual_base == "probe":
            base.append(clone(first.io.outputs(output)))

    def after_last(module, args, output):
        end.append(clone(last.io.outputs(output)))

    handles = [first.module.register_forward_pre_hook(before_first, with_kwargs=True),
               first.module.register_forward_hook(after_first, with_kwargs=True),
               last.module.register_forward_hook(after_last)]
    return base, end, handles


def test_cfg_branches_never_mix(model):
    """With hits on odd steps, each branch's (or batch half's) hit must equal its own base plus its own
    residual from the step before; mixed branches would add the other branch's residual."""
    name, pipe = model
    adapter = for_pipeline(pipe)
    call = dict(CFG_CALLS[name], num_inference_steps=4)
    base, end, handles = _record_span(pipe, adapter)
    try:
        generate(pipe, **call)
        reference_base, reference_end = list(base), list(end)
        base.clear(), end.clear()
        with accel.apply(pipe, CACHING) as applied:
            generate(pipe, **call)
            hit_map = applied.stats()["cache"]["hit_map"]
    finally:
        for h in handles:
            h.remove()
    branches = len(hit_map)
    assert branches == (2 if name in SEPARATE_CALL_CFG else 1) and all(m == "CHCH" for m in hit_map)
    for branch in range(branches):
        full, hit = branch, branches + branch  # step 0 and step 1 of this branch
        for stream in (0, 1):  # hidden, and encoder where the last block returns it
            if end[hit][stream] is None:
                continue
            expected = reference_base[hit][stream] + (reference_end[full][stream] - reference_base[full][stream])
            torch.testing.assert_close(end[hit][stream], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_first", [True, False])
def test_a_lora_loaded_before_or_after_the_cache_takes_effect(model, lora_first):
    from peft import LoraConfig

    name, _ = model
    pipe = tiny_pipeline(name)  # a pipeline of its own: the LoRA stays in it
    pipe.set_progress_bar_config(disable=True)
    denoiser = for_pipeline(pipe).denoiser(pipe)
    baseline = run(name, pipe)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    if lora_first:
        denoiser.add_adapter(lora)
        with_lora = run(name, pipe)
        applied = accel.apply(pipe, OFF)
    else:
        applied = accel.apply(pipe, OFF)
        denoiser.add_adapter(lora)
        with_lora = None
    cached = run(name, pipe)
    applied.remove()
    plain_lora = run(name, pipe)
    assert not torch.equal(plain_lora, baseline)  # the LoRA changes the output...
    assert torch.equal(cached, plain_lora)  # ...under the cache as without it
    if with_lora is not None:
        assert torch.equal(with_lora, plain_lora)


def test_stochastic_schedulers_still_work(model):
    name, pipe = model
    from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    original = pipe.scheduler
    if isinstance(original, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, stochastic_sampling=True)
    else:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    def noisy_generate():
        torch.manual_seed(0)  # some schedulers draw their step noise from the global generator
        return run(name, pipe)

    try:
        baseline = noisy_generate()
        with accel.apply(pipe, OFF):
            assert torch.equal(noisy_generate(), baseline)
        with accel.apply(pipe, CACHING) as applied:
            out = noisy_generate()
            assert applied.stats()["cache"]["cached"] > 0
        assert torch.isfinite(out).all()
    finally:
        pipe.scheduler = original


def test_teacache_without_coefficients_or_probe_says_what_to_do():
    from accel.errors import AccelError

    sd3 = tiny_pipeline("sd35_tiny")
    with pytest.raises(AccelError, match="no published TeaCache coefficients.*accel.calibrate"):
        accel.apply(sd3, {"cache": {"strategy": "teacache"}})
    with accel.apply(sd3, {"cache": {"strategy": "teacache", "coefficients": IDENTITY}}) as applied:
        assert applied.stats()["cache"]["strategy"] == "teacache"
    sdxl = tiny_pipeline("sdxl_tiny")
    with pytest.raises(AccelError, match="modulated-input probe"):
        accel.apply(sdxl, {"cache": {"strategy": "teacache"}})
    with pytest.raises(AccelError, match="last_blocks=1"):
        accel.apply(sdxl, {"cache": {"strategy": "mbcache", "first_blocks": 1, "last_blocks": 1}})
