"""MBCache, TeaCache and Taylor forecasting on the tiny FLUX: exactness when off, which blocks a hit
skips, the first/last-step rule, and forecasting's lower error at the same hit count."""
import re
import statistics

import numpy as np
import pytest
import torch

import accel
from accel.errors import AccelError, ConfigError
from tests.helpers import IDENTITY, STEPS, CallCounter, flux_blocks, generate

ALWAYS = 1e9


def run_cache(pipe, **cache):
    with accel.apply(pipe, {"cache": cache}) as run:
        out = generate(pipe)
        return out, run.stats()["cache"]


@pytest.mark.parametrize("cache", [
    {"strategy": "mbcache", "residual_diff_threshold": 0.0, "first_blocks": 1, "last_blocks": 1},
    {"strategy": "mbcache", "residual_diff_threshold": 0.0, "first_blocks": 2, "probe": "per_block"},
    {"strategy": "teacache", "rel_l1_threshold": 0.0},
    {"strategy": "fbcache", "residual_diff_threshold": 0.0, "forecast": "taylor", "forecast_order": 2},
])
def test_off_setting_is_bit_identical_to_the_baseline(pipe, baseline, cache):
    out, stats = run_cache(pipe, **cache)
    assert torch.equal(out, baseline) and stats["cached"] == 0


@pytest.mark.parametrize("cache, expected", [
    # F1B1 over 10 blocks: block 0 probes, block 9 always runs, blocks 1-8 only on the full step
    ({"first_blocks": 1, "last_blocks": 1}, [STEPS] + [1] * 8 + [STEPS]),
    # F2B0 probed after block 1 only: both first blocks always run
    ({"first_blocks": 2, "last_blocks": 0}, [STEPS, STEPS] + [1] * 8),
    # F2B0 with per-block exit: the probe after block 0 already passes, so block 1 is skipped too
    ({"first_blocks": 2, "last_blocks": 0, "probe": "per_block"}, [STEPS] + [1] * 9),
    # F8B0, cache-dit's default, as flux_mbcache ships it
    ({"first_blocks": 8, "last_blocks": 0}, [STEPS] * 8 + [1] * 2),
])
def test_mbcache_hits_skip_exactly_the_cached_span(pipe, cache, expected):
    counter = CallCounter([b.attn for b in flux_blocks(pipe)])
    try:
        _, stats = run_cache(pipe, strategy="mbcache", residual_diff_threshold=ALWAYS, **cache)
    finally:
        counter.remove()
    assert stats["hit_map"] == ["C" + "H" * (STEPS - 1)]
    assert counter.counts == expected


def test_mbcache_refuses_fn_plus_bn_covering_every_block(pipe):
    with pytest.raises(AccelError, match=r"first_blocks=9 \+ cache.last_blocks=1.*10 blocks"):
        accel.apply(pipe, {"cache": {"strategy": "mbcache", "first_blocks": 9, "last_blocks": 1}})
    assert type(pipe).__name__ == "FluxPipeline" and "forward" not in flux_blocks(pipe)[0].__dict__


def test_teacache_always_computes_first_and_last_step(pipe):
    _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=ALWAYS)
    assert stats["hit_map"] == ["C" + "H" * (STEPS - 2) + "C"]


def test_teacache_uses_given_coefficients(pipe):
    # a zero polynomial never accumulates, so even a minute threshold hits
    _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=1e-12, coefficients=[0.0] * 5)
    assert stats["cached"] == STEPS - 2
    _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=1e-12, coefficients=IDENTITY)
    assert stats["cached"] == 0


def test_teacache_resets_its_accumulated_distance_after_a_full_step(pipe):
    identity = dict(strategy="teacache", coefficients=IDENTITY)  # rescale(d) = d
    _, probe = run_cache(pipe, rel_l1_threshold=0.0, **identity)
    threshold = 2.5 * statistics.median(d for d in probe["diffs"][0] if d is not None)
    _, stats = run_cache(pipe, rel_l1_threshold=threshold, **identity)
    # TeaCache's rule, replayed on the distances the cached run reports: a step without one computes
    expected, accumulated = "", 0.0
    for distance in stats["diffs"][0]:
        if distance is not None:
            accumulated += abs(distance)
            if accumulated < threshold:
                expected += "H"
                continue
        expected += "C"
        accumulated = 0.0
    assert stats["hit_map"] == [expected]
    assert re.search("HC+H", expected), expected  # hits again after a full step


def test_teacaches_distance_is_always_to_the_previous_steps_modulated_input(pipe):
    """TeaCache compares consecutive steps, hits included (its accumulated sum carries the drift across
    them): each reported distance against the modulated inputs a hook of the test's own recorded."""
    from accel.families import for_pipeline

    adapter = for_pipeline(pipe)
    first = adapter.blocks(pipe.transformer)[0]
    modulated = []

    def record(module, args, kwargs):
        modulated.append(adapter.modulated_input(module, first, args, kwargs))

    handle = first.module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=ALWAYS, max_consecutive_hits=2)
    finally:
        handle.remove()
    hit_map, diffs = stats["hit_map"][0], stats["diffs"][0]
    assert "HH" in hit_map and len(modulated) == STEPS
    measured = [(step, d) for step, d in enumerate(diffs) if d is not None]
    assert len(measured) >= STEPS // 2
    for step, distance in measured:
        expected = ((modulated[step] - modulated[step - 1]).abs().mean() / modulated[step - 1].abs().mean()).item()
        assert distance == pytest.approx(expected, rel=1e-6), (step, hit_map)


def test_teacache_threshold_must_be_non_negative():
    with pytest.raises(ConfigError, match="rel_l1_threshold"):
        accel.compose("flux_teacache", ["cache.rel_l1_threshold=-1"])


@pytest.mark.parametrize("cache", [
    {"strategy": "fbcache", "residual_diff_threshold": ALWAYS},
    {"strategy": "mbcache", "residual_diff_threshold": ALWAYS, "first_blocks": 1, "last_blocks": 1},
    {"strategy": "teacache", "rel_l1_threshold": ALWAYS},
])
def test_taylor_forecast_lowers_the_error_at_the_same_hit_count(pipe, baseline, cache):
    stale, stale_stats = run_cache(pipe, **cache, max_consecutive_hits=2)
    taylor, taylor_stats = run_cache(pipe, **cache, max_consecutive_hits=2, forecast="taylor", forecast_order=1)
    assert taylor_stats["hit_map"] == stale_stats["hit_map"] and taylor_stats["cached"] > 0
    assert (taylor - baseline).pow(2).mean() < (stale - baseline).pow(2).mean()


def test_fit_coefficients_recovers_a_known_polynomial():
    from accel.calibrate import fit_coefficients

    known = [3.0, -2.0, 0.5, 0.1]  # highest order first
    x = np.linspace(0.01, 0.6, 25)
    fitted = fit_coefficients(np.stack([x, np.polyval(known, x)], axis=1), order=3)
    np.testing.assert_allclose(fitted, known, rtol=1e-6, atol=1e-9)


def test_calibration_pairs_are_teacaches_distance_and_the_stack_residuals_change(pipe):
    from accel.calibrate import calibrate

    prompt, seed = "a lighthouse at night", 3
    blocks, inputs, outputs = flux_blocks(pipe), [], []
    handles = [  # FLUX blocks take keywords and return (encoder, hidden)
        blocks[0].register_forward_pre_hook(lambda m, args, kwargs: inputs.append(kwargs["hidden_states"]),
                                            with_kwargs=True),
        blocks[-1].register_forward_hook(lambda m, args, output: outputs.append(output[1])),
    ]
    try:
        _, pairs = calibrate(pipe, dict(num_inference_steps=STEPS, height=64, width=64, output_type="pt"),
                             prompts=(prompt,), order=1, seed=seed)
    finally:
        for handle in handles:
            handle.remove()
    assert pairs.shape == (STEPS - 1, 2)
    with accel.apply(pipe, {"cache": {"strategy": "teacache", "rel_l1_threshold": 0.0}}) as run:
        generate(pipe, seed=seed, prompt=prompt)
        diffs = run.stats()["cache"]["diffs"][0][1:]  # the pair of step k+1 compares it with step k
    probed = [(x, d) for x, d in zip(pairs[:, 0], diffs) if d is not None]
    assert len(probed) == STEPS - 2  # TeaCache takes no distance on its always-computed last step
    for x, d in probed:
        assert x == pytest.approx(d, abs=1e-5)  # reported to 5 decimals
    residuals = [o - i for i, o in zip(inputs, outputs)]
    for k, y in enumerate(pairs[:, 1]):
        before, now = residuals[k], residuals[k + 1]
        assert y == pytest.approx(((now - before).abs().mean() / before.abs().mean()).item(), rel=1e-6)


def test_calibration_refuses_fewer_steps_than_the_fit_needs(pipe):
    from accel.calibrate import calibrate, min_steps

    assert min_steps(4) == 6
    with pytest.raises(AccelError, match=r"steps=1 is not allowed: calibrating an order-4 polynomial needs at least "
                                         r"6 steps"):
        calibrate(pipe, dict(num_inference_steps=1, height=32, width=32), order=4)
    coefficients, pairs = calibrate(pipe, dict(num_inference_steps=min_steps(1), height=32, width=32),
                                    prompts=("a red fox",), order=1)  # the fewest steps still fit
    assert len(pairs) == 2 and len(coefficients) == 2 and np.isfinite(coefficients).all()


def test_calibration_fits_a_polynomial_from_input_change_to_residual_change(pipe):
    from accel.calibrate import calibrate

    coefficients, pairs = calibrate(pipe, dict(num_inference_steps=5, height=32, width=32),
                                    prompts=("a red fox", "a lighthouse"), order=2)
    assert len(coefficients) == 3 and all(map(lambda c: c == c, coefficients))
    assert pairs.shape == (2 * 4, 2) and (pairs >= 0).all()


def test_coefficients_fitted_on_another_architecture_warn_in_one_line(pipe, caplog):
    with caplog.at_level("WARNING", logger="accel"):
        accel.apply(pipe, {"cache": {"strategy": "teacache", "coefficients": IDENTITY, "fitted_on": "sd3"}}).remove()
    [record] = [r for r in caplog.records if r.name == "accel"]
    assert re.search("fitted on sd3.*this is a flux model", record.getMessage()) and "\n" not in record.getMessage()


def test_teacache_without_coefficients_or_probe_says_what_to_do():
    from tests.helpers import tiny_pipeline

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


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_cache_on_a_controlnet_pipeline_is_refused_saying_why(family):
    """A ControlNet's residuals are added between the blocks a hit skips: refused, not silently wrong."""
    import diffusers

    from tests.helpers import tiny_option, tiny_pipeline

    base = tiny_pipeline(tiny_option(family))
    if family == "sdxl":
        controlnet = diffusers.ControlNetModel.from_unet(base.unet)
        pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=controlnet)
    else:
        config = base.transformer.config
        controlnet = diffusers.FluxControlNetModel(
            in_channels=config.in_channels, num_layers=1, num_single_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
            pooled_projection_dim=config.pooled_projection_dim, axes_dims_rope=config.axes_dims_rope)
        pipe = diffusers.FluxControlNetPipeline.from_pipe(base, controlnet=controlnet)
    with pytest.raises(AccelError, match=r"^cache.strategy='fbcache' is not allowed on .*ControlNetPipeline: its "
                                         r"ControlNet adds residuals between the denoiser's blocks"):
        accel.apply(pipe, {"cache": {"strategy": "fbcache"}})
    assert type(pipe).__name__.endswith("ControlNetPipeline") and "_accel_layers" not in vars(pipe)
