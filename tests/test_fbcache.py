"""First Block Cache on the tiny FLUX pipeline: exactness, hit accounting, per-call state, CFG, removal."""
import pytest
import torch

import accel
from accel.errors import AccelError
from tests.helpers import STEPS, CallCounter, cache_recipe, flux_blocks, generate

ALWAYS = 1e9  # a threshold every probe passes: hits are then decided by the shared controls alone


def test_threshold_zero_is_bit_identical_to_the_baseline(pipe, baseline):
    with accel.apply(pipe, cache_recipe(residual_diff_threshold=0.0)) as run:
        out = generate(pipe)
        stats = run.stats()["cache"]
    assert torch.equal(out, baseline)
    assert stats["computed"] == STEPS and stats["cached"] == 0 and stats["steps"] == STEPS


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


def test_an_applied_pipeline_keeps_its_call_signature(pipe):
    import inspect

    before = inspect.signature(pipe.__call__)
    with accel.apply(pipe, cache_recipe()):
        assert inspect.signature(pipe.__call__) == before
