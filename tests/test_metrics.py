"""Quality metrics against a baseline: exact values on constructed arrays."""
import math

import numpy as np
import pytest

from accel import metrics
from accel.errors import ConfigError


def images(seed=0, shape=(2, 16, 16, 3)):
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=shape)


def test_identical_outputs_are_perfect():
    reference = images()
    result = metrics.metrics(["psnr", "ssim", "mean_abs", "max_abs"], reference.copy(), reference)
    assert result == {"psnr": math.inf, "ssim": pytest.approx(1.0), "mean_abs": 0.0, "max_abs": 0.0}


def test_a_known_error_gives_a_known_psnr():
    reference = images()
    output = reference + 0.1  # MSE 0.01 on [0, 1] pixels: 20 dB
    assert metrics.psnr(output, reference) == pytest.approx(20.0)
    assert metrics.mean_abs(output, reference) == pytest.approx(0.1)
    assert metrics.max_abs(output, reference) == pytest.approx(0.1)
    assert metrics.ssim(output, reference) < 1.0


def test_ssim_falls_with_noise():
    reference = images()
    slightly = reference + np.random.default_rng(1).normal(0, 0.02, reference.shape)
    badly = reference + np.random.default_rng(1).normal(0, 0.2, reference.shape)
    assert 1.0 > metrics.ssim(slightly, reference) > metrics.ssim(badly, reference)


def test_a_flickering_frame_raises_flicker_but_a_steady_offset_does_not():
    reference = images(shape=(1, 6, 16, 16, 3))
    steady = reference + 0.05  # every frame off by the same amount: no flicker
    flickering = reference.copy()
    flickering[:, 3] += 0.05  # one frame jumps
    assert metrics.flicker(steady, reference) == pytest.approx(0.0)
    assert metrics.flicker(flickering, reference) > 0.01
    per_frame = metrics.frame_psnr(flickering, reference)
    assert len(per_frame) == 6 and per_frame[3] == pytest.approx(10 * math.log10(1 / 0.0025))
    assert all(math.isinf(p) for i, p in enumerate(per_frame) if i != 3)


def test_video_figures_on_images_are_unavailable_with_a_reason():
    reference = images()
    result = metrics.metrics(["psnr", "flicker", "frame_psnr"], reference, reference)
    assert result["flicker"] is None and result["frame_psnr"] is None
    assert "not video" in result["unavailable"]["flicker"]


def test_latents_when_given():
    reference = images()
    latents = np.ones((1, 4, 8, 8))
    result = metrics.metrics(["latent_mean_abs", "latent_relative_l2"], reference, reference,
                             latents=latents * 1.5, reference_latents=latents)
    assert result == {"latent_mean_abs": pytest.approx(0.5), "latent_relative_l2": pytest.approx(0.5)}
    missing = metrics.metrics(["latent_max_abs"], reference, reference)
    assert missing == {"latent_max_abs": None, "unavailable": {"latent_max_abs": "no latents given"}}


def test_task_accuracy_needs_toy_prompts():
    from accel.toy import shapes

    pictures, prompts = shapes.dataset(4, seed=3)
    result = metrics.metrics(["task_accuracy"], pictures / 255, pictures / 255, prompts=prompts)
    assert result == {"task_accuracy": 1.0}
    other = metrics.metrics(["task_accuracy"], pictures / 255, pictures / 255, prompts="a red fox in the snow")
    assert other["task_accuracy"] is None and "toy shape set" in other["unavailable"]["task_accuracy"]


def test_lpips_without_its_package_or_weights_is_none_with_the_reason():
    reference = images()
    result = metrics.metrics(["lpips"], reference, reference)
    if metrics._lpips_weights() is None:
        assert result["lpips"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert result["lpips"] is None and result["unavailable"]["lpips"] == metrics._lpips_weights()


def test_an_unknown_metric_is_refused_with_the_known_ones():
    reference = images()
    with pytest.raises(ConfigError, match=r"metrics: 'fid' is not a metric; the metrics are psnr, ssim, .*flicker"):
        metrics.metrics(["psnr", "fid"], reference, reference)


def test_outputs_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(images(shape=(1, 8, 8, 3)), images(shape=(1, 8, 16, 3)))


def test_without_names_every_metric_that_fits_the_inputs():
    reference = images()
    result = metrics.metrics(None, reference, reference, latents=np.ones(3), reference_latents=np.ones(3))
    # images: no video figures, no toy prompts; latents given: their figures are in
    assert {"psnr", "ssim", "mean_abs", "max_abs", "latent_relative_l2"} <= set(result)
    assert not {"flicker", "frame_psnr", "task_accuracy"} & set(result)
    assert ("lpips" in result) and (result["lpips"] is None) == (metrics._lpips_weights() is not None)
