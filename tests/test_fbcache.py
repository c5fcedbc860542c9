"""First Block Cache on the tiny FLUX pipeline: exactness, hit accounting, per-call state, CFG, removal."""
import math

import pytest
import torch

import accel
from accel.errors import AccelError
from accel.families import ADAPTERS, for_pipeline
from accel.strategies.block_cache import relative_l1
from tests.helpers import STEPS, CallCounter, cache_recipe, flux_blocks, generate, tiny_pipeline

ALWAYS = 1e9  # a threshold every probe passes: hits are then decided by the shared controls alone


def test_threshold_zero_is_bit_identical_to_the_baseline(pipe, baseline):
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=0.0)) as run:
        out = generate(pipe)
        stats = run.stats()["cache"]
    assert torch.equal(out, baseline)
    assert stats["computed"] == STEPS and stats["cached"] == 0 and stats["steps"] == STEPS


def test_relative_l1_is_the_mean_absolute_change_over_the_mean_absolute_reference():
    ones = torch.ones(2, 3)
    assert relative_l1(1.25 * ones, ones) == pytest.approx(0.25)
    assert relative_l1(ones, 1.25 * ones) == pytest.approx(0.2)  # relative to `before`, the second argument
    before = torch.tensor([1.0, -2.0, 3.0, -4.0])  # mean|before| = 2.5
    assert relative_l1(torch.tensor([2.0, -2.0, 1.0, 0.0]), before) == pytest.approx(1.75 / 2.5)
    assert relative_l1(-before, before) == pytest.approx(2.0)  # signs count: no cancelling in the mean


def _block0_residuals(pipe) -> list[torch.Tensor]:
    """Block 0's hidden residual (output − input) per denoiser call of one plain generation."""
    residuals = []

    def hook(module, args, kwargs, output):  # FLUX blocks take keywords and return (encoder, hidden)
        residuals.append(output[1] - kwargs["hidden_states"])

    handle = flux_blocks(pipe)[0].register_forward_hook(hook, with_kwargs=True)
    try:
        generate(pipe)
    finally:
        handle.remove()
    return residuals


def test_the_reported_distance_is_block_zeros_residual_change_and_decides_the_hit(pipe):
    r0, r1 = _block0_residuals(pipe)[:2]
    distance = ((r1 - r0).abs().mean() / r0.abs().mean()).item()
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=0.0)) as run:
        generate(pipe)
        assert run.stats()["cache"]["diffs"][0][1] == pytest.approx(distance, abs=1e-5)  # reported to 5 decimals
    for threshold, step1 in ((distance * 1.001, "H"), (distance * 0.999, "C")):
        with accel.apply(pipe, cache_recipe(residual_diff_threshold=threshold)) as run:
            generate(pipe)
            assert run.stats()["cache"]["hit_map"][0][:2] == "C" + step1, threshold


def test_a_threshold_equal_to_a_measured_distance_does_not_hit(pipe):
    """The rule is distance < threshold: set the threshold to a distance the cache measured, exactly,
    and that step computes; the next float above it, and it is a hit."""
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=0.0)) as run:
        generate(pipe)
        diffs = run.stats()["cache"]["diffs"][0]
    step = min((d, k) for k, d in enumerate(diffs) if d is not None)[1]  # every earlier distance is larger
    for threshold, expected in ((diffs[step], "C"), (math.nextafter(diffs[step], math.inf), "H")):
        with accel.apply(pipe, cache_recipe(residual_diff_threshold=threshold)) as run:
            generate(pipe)
            stats = run.stats()["cache"]
        assert stats["hit_map"][0][:step] == "C" * step and stats["diffs"][0][step] == diffs[step]
        assert stats["hit_map"][0][step] == expected, (threshold, stats["hit_map"])


def test_each_distance_is_to_the_last_fully_computed_step(pipe):
    """Checked against block 0's residuals recorded by a hook of the test's own: with two hits in a row,
    the second is measured against the step before the first, not against the hit before it."""
    residuals = []

    def record(module, args, kwargs, output):  # FLUX blocks take keywords and return (encoder, hidden)
        residuals.append(output[1] - kwargs["hidden_states"])

    handle = flux_blocks(pipe)[0].register_forward_hook(record, with_kwargs=True)
    try:
        with accel.apply(pipe, cache_recipe(residual_diff_threshold=ALWAYS, max_consecutive_hits=2)) as run:
            generate(pipe)
            stats = run.stats()["cache"]
    finally:
        handle.remove()
    hit_map, diffs = stats["hit_map"][0], stats["diffs"][0]
    assert "HH" in hit_map and len(residuals) == STEPS
    last_computed, checked = None, 0
    for step, (hit, distance) in enumerate(zip(hit_map, diffs)):
        if distance is not None:
            expected = relative_l1(residuals[step], residuals[last_computed])
            assert distance == pytest.approx(expected, rel=1e-6), step
            checked += 1
        if hit == "C":
            last_computed = step
    assert checked >= STEPS // 2


def test_a_hit_skips_every_block_after_the_first(pipe):
    blocks = flux_blocks(pipe)
    counter = CallCounter([b.attn for b in blocks])
    try:
        with accel.apply(pipe, cache_recipe(residual_diff_threshold=ALWAYS)) as run:
            generate(pipe)
            stats = run.stats()["cache"]
    finally:
        counter.remove()
    assert stats["hit_map"] == ["C" + "H" * (STEPS - 1)]
    assert stats["cached"] == STEPS - 1 and stats["computed"] == 1
    assert counter.counts[0] == STEPS  # block 0 is the probe: it always runs
    assert counter.counts[1:] == [1] * (len(blocks) - 1)  # the rest only on the one full step


def test_caching_changes_the_output_but_stays_close(pipe, baseline):
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=ALWAYS, max_consecutive_hits=1)):
        out = generate(pipe)
    assert not torch.equal(out, baseline)
    assert (out - baseline).abs().max() < 0.5


@pytest.mark.parametrize(
    "controls, expected",
    [
        ({"warmup_steps": 3}, "CCC" + "H" * (STEPS - 3)),
        ({"max_consecutive_hits": 2}, "CHHCHHCH"),
        ({"max_consecutive_hits": 0}, "C" * STEPS),
        ({"start": 0.5}, "C" * (STEPS // 2) + "H" * (STEPS // 2)),
        ({"end": 0.5}, "C" + "H" * (STEPS // 2 - 1) + "C" * (STEPS // 2)),
        ({"max_cached_steps": 3}, "CHHH" + "C" * (STEPS - 4)),
    ],
)
def test_shared_controls_shape_the_hit_map(pipe, controls, expected):
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=ALWAYS, **controls)) as run:
        generate(pipe)
        assert run.stats()["cache"]["hit_map"] == [expected]


def test_no_state_survives_a_generation(pipe):
    """Two different calls on one cached pipeline equal the same calls on freshly cached pipelines."""
    recipe = cache_recipe(residual_diff_threshold=ALWAYS, max_consecutive_hits=2)
    calls = [dict(prompt="a red fox", seed=1),
             dict(prompt="a lighthouse at night", seed=2, height=32, width=48, num_inference_steps=5),
             dict(prompt="a red fox", seed=1, num_images_per_prompt=2)]
    with accel.apply(pipe, recipe):
        together = [generate(pipe, **c) for c in calls]
    for call, out in zip(calls, together):
        with accel.apply(pipe, recipe):
            assert torch.equal(generate(pipe, **call), out)


@pytest.mark.parametrize("recipe", [
    cache_recipe(residual_diff_threshold=0.4),  # hits on some steps, by distance
    cache_recipe(residual_diff_threshold=ALWAYS, max_consecutive_hits=2),  # a leaked residual would hit at step 0
])
def test_no_state_survives_between_generations_of_the_same_shape(pipe, recipe):
    """Same-shape calls pass every shape check, so only fresh state per call keeps them apart; stats
    describe the latest call alone."""
    calls = [dict(prompt="a red fox", seed=1), dict(prompt="a lighthouse at night", seed=1),
             dict(prompt="a red fox", seed=2)]
    with accel.apply(pipe, recipe) as run:
        together = [(generate(pipe, **c), run.stats()["cache"]) for c in calls]
    for n, (call, (out, stats)) in enumerate(zip(calls, together), start=1):
        with accel.apply(pipe, recipe) as run:
            assert torch.equal(generate(pipe, **call), out)
            fresh = run.stats()["cache"]
        assert fresh["steps"] == STEPS and fresh["computed"] + fresh["cached"] == STEPS
        assert "H" in fresh["hit_map"][0] and "C" in fresh["hit_map"][0][1:]  # the threshold really decides
        assert stats == {**fresh, "generations": n}


def test_remove_restores_the_pipeline_exactly(pipe, baseline):
    pipeline_class = type(pipe)
    run = accel.apply(pipe, cache_recipe(residual_diff_threshold=ALWAYS))
    assert type(pipe) is not pipeline_class and isinstance(pipe, pipeline_class)
    generate(pipe)
    run.remove()
    assert type(pipe) is pipeline_class
    assert all("forward" not in b.__dict__ for b in flux_blocks(pipe))
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert torch.equal(generate(pipe), baseline)


def test_applying_twice_without_removing_is_refused(pipe):
    with accel.apply(pipe, cache_recipe()):
        with pytest.raises(AccelError, match="remove"):
            accel.apply(pipe, cache_recipe())


def test_recipe_name_and_composed_recipe_both_apply(pipe):
    with accel.apply(pipe, "flux_fbcache", ["model=flux_tiny", "cache.residual_diff_threshold=0"]) as run:
        generate(pipe)
        assert run.stats()["cache"]["strategy"] == "fbcache"


def test_a_model_the_cache_does_not_know_is_refused_naming_the_supported_ones():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    other = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(AccelError, match=r"no block adapter.*flux \(FluxTransformer2DModel\)"):
        accel.apply(other, cache_recipe())
    assert type(other) is DDPMPipeline


def test_a_subclassed_denoiser_gets_its_base_class_adapter(baseline):
    from diffusers import FluxTransformer2DModel

    pipe = tiny_pipeline()
    pipe.transformer.__class__ = type("MyFlux", (FluxTransformer2DModel,), {})
    assert for_pipeline(pipe) is ADAPTERS["flux"]
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=0.0)) as run:
        assert torch.equal(generate(pipe), baseline)
        assert run.stats()["cache"]["computed"] == STEPS


def test_a_compiled_denoiser_gets_its_adapter_and_hooks_land_on_the_real_module(baseline):
    pipe = tiny_pipeline()
    real = pipe.transformer
    pipe.transformer = torch.compile(real, backend="eager")
    adapter = for_pipeline(pipe)
    assert adapter is ADAPTERS["flux"] and adapter.denoiser(pipe) is real
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=0.0)) as run:
        assert torch.equal(generate(pipe), baseline)
        assert run.stats()["cache"]["computed"] == STEPS  # the hooks on the real module saw every step
    assert not real._forward_pre_hooks and all("forward" not in b.__dict__ for b in flux_blocks(pipe))


def test_an_applied_pipeline_keeps_its_call_signature(pipe):
    import inspect

    before = inspect.signature(pipe.__call__)
    with accel.apply(pipe, cache_recipe()):
        assert inspect.signature(pipe.__call__) == before


def test_two_pipelines_sharing_a_denoiser_cannot_stack_caches_on_it(pipe, baseline):
    """The hooks sit on the denoiser: a second pipeline holding the same transformer is refused while
    the first run is applied, so no removal order can leave stale wrappers behind."""
    from diffusers import FluxPipeline

    other = FluxPipeline(**pipe.components)
    first = accel.apply(pipe, cache_recipe(residual_diff_threshold=ALWAYS))
    with pytest.raises(AccelError, match="FluxTransformer2DModel.*shared with another pipeline.*remove"):
        accel.apply(other, cache_recipe(residual_diff_threshold=ALWAYS))
    first.remove()
    with accel.apply(other, cache_recipe(residual_diff_threshold=0.0)):
        assert torch.equal(generate(other), baseline)
    assert all("forward" not in b.__dict__ for b in flux_blocks(pipe))
    assert torch.equal(generate(pipe), baseline)


def test_unknown_stage_keys_fail_naming_the_stages_and_block_nothing(pipe):
    from accel.errors import ConfigError

    with pytest.raises(ConfigError, match="'cahce' is not a stage.*quant, attention, parallel, cache, compile"):
        accel.apply(pipe, {"cahce": {"strategy": "fbcache"}})
    with accel.apply(pipe, cache_recipe()) as run:  # nothing was left applied
        assert run.stats()["cache"]["strategy"] == "fbcache"


def test_a_bare_transformer_is_refused_saying_to_pass_the_pipeline(pipe):
    with pytest.raises(AccelError, match="takes the pipeline that holds this FluxTransformer2DModel"):
        accel.apply(pipe.transformer, cache_recipe())


@pytest.mark.parametrize("cache", [
    {"strategy": "fbcache", "residual_diff_threshold": 0.0},
    {"strategy": "teacache", "rel_l1_threshold": 0.0},
])
def test_a_cache_that_hits_nothing_suggests_a_threshold_that_caches_about_half(pipe, cache):
    from accel.report import cache_note

    with accel.apply(pipe, {"cache": cache}) as run:
        generate(pipe, num_inference_steps=16)
        stats = run.stats()["cache"]
    threshold = stats["threshold"]
    suggested = threshold["caches_about_half"]
    note = cache_note(stats)
    assert "cached 0 of 16 calls" in note and f"cache.{threshold['name']}={suggested:.3g}" in note
    with accel.apply(pipe, {"cache": {**cache, threshold["name"]: suggested}}) as run:
        generate(pipe, num_inference_steps=16)
        cached = run.stats()["cache"]["cached"]
    assert 4 <= cached <= 12  # about half of 16 steps
