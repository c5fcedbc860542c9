"""MBCache, TeaCache and Taylor forecasting on the tiny FLUX: exactness when off, which blocks a hit
skips, the first/last-step rule, and forecasting's lower error at the same hit count."""
import pytest
import torch

import accel
from accel.errors import AccelError, ConfigError
from tests.helpers import STEPS, CallCounter, flux_blocks, generate

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
    # F1B1 over 4 blocks: block 0 probes, block 3 always runs, blocks 1-2 only on the full step
    ({"first_blocks": 1, "last_blocks": 1}, [STEPS, 1, 1, STEPS]),
    # F2B0 probed after block 1 only: both first blocks always run
    ({"first_blocks": 2, "last_blocks": 0}, [STEPS, STEPS, 1, 1]),
    # F2B0 with per-block exit: the probe after block 0 already passes, so block 1 is skipped too
    ({"first_blocks": 2, "last_blocks": 0, "probe": "per_block"}, [STEPS, 1, 1, 1]),
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
    with pytest.raises(AccelError, match=r"first_blocks=3 \+ cache.last_blocks=1.*4 blocks"):
        accel.apply(pipe, {"cache": {"strategy": "mbcache", "first_blocks": 3, "last_blocks": 1}})
    assert type(pipe).__name__ == "FluxPipeline" and "forward" not in flux_blocks(pipe)[0].__dict__


def test_teacache_always_computes_first_and_last_step(pipe):
    _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=ALWAYS)
    assert stats["hit_map"] == ["C" + "H" * (STEPS - 2) + "C"]


def test_teacache_uses_given_coefficients(pipe):
    # a zero polynomial never accumulates, so even a minute threshold hits
    _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=1e-12, coefficients=[0.0, 0.0])
    assert stats["cached"] == STEPS - 2
    _, stats = run_cache(pipe, strategy="teacache", rel_l1_threshold=1e-12, coefficients=[1.0, 0.0])
    assert stats["cached"] == 0


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


def test_calibration_fits_a_polynomial_from_input_change_to_residual_change(pipe):
    from accel.calibrate import calibrate

    coefficients, pairs = calibrate(pipe, dict(num_inference_steps=5, height=32, width=32),
                                    prompts=("a red fox", "a lighthouse"), order=2)
    assert len(coefficients) == 3 and all(map(lambda c: c == c, coefficients))
    assert pairs.shape == (2 * 4, 2) and (pairs >= 0).all()
