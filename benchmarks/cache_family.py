"""The cache family on flux_toy, a tiny FLUX trained on a shapes task (real denoising dynamics, unlike the
random-weight tiny models), measured side by side in one run and printed as one Markdown table:
FBCache at three thresholds with no forecast and with Taylor forecasting of order 1 and 2, MBCache F8B0
with and without Taylor, and TeaCache with and without Taylor, with the published FLUX coefficients and
with coefficients calibrated on flux_toy.

The calibration runs first, in this process, as `python -m accel.calibrate model=flux_toy` does: the
six toy prompts of accel.prompts.toy_prompts, none of which is measured here. The calibrated polynomial
predicts the stack's residual change in the same units as the published one, but flux_toy's steps are
far smaller than the published polynomial says, so its thresholds are lower (0.1-0.25 rather than
0.25-0.8), each chosen to compute about as many steps as a published one, where their quality compares.

computed/calls: denoiser calls that ran every block, summed over the prompts. Speedup: the median, over
rounds (one per prompt and pass), of the baseline's time over the variant's, each variant timed right
after a baseline generation of its own, so that a neighbour process slowing the CPU moves both alike.
PSNR (pixels pooled over the prompts) and SSIM (mean) against the baseline of the same prompt and seed;
task accuracy: the fraction of images accel.toy.checker finds showing the shape, colour and position
their prompt asks for (the baseline's is on the first line).

    python benchmarks/cache_family.py [--prompts 4] [--passes 1] [--threads 1] [--steps 28] [overrides...]
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

import accel
from accel import calibrate
from accel.prompts import toy_prompts
from accel.strategies.teacache import ORDER
from accel.metrics import metrics, task_accuracy
from accel.families import ADAPTERS
from accel.toy.shapes import Scene
from common import describe, load, timed

# measured prompts: spread over shapes, colours, sizes and places, none of them a calibration prompt
PROMPTS = tuple(Scene(*words).prompt for words in (
    ("circle", "red", "large", "top", "left"), ("triangle", "yellow", "small", "middle", "center"),
    ("square", "blue", "large", "top", "right"), ("circle", "green", "small", "bottom", "center"),
    ("triangle", "green", "large", "middle", "left"), ("square", "yellow", "small", "top", "center"),
    ("circle", "blue", "small", "middle", "right"), ("triangle", "red", "small", "bottom", "left")))
assert not set(PROMPTS) & set(toy_prompts())

FB_THRESHOLDS = (0.08, 0.16, 0.3)  # 0.08: the shipped default (published FLUX range 0.08-0.12)
TEA_PUBLISHED = (0.25, 0.4, 0.6, 0.8)  # 0.25-0.6: the published FLUX thresholds (1.5x, 1.8x, 2.0x on FLUX.1-dev)
TEA_CALIBRATED = (0.1, 0.125, 0.2, 0.25)  # the i-th computes about as many steps as the i-th published


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux_toy")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1), metavar="N",
                        help=f"how many of the {len(PROMPTS)} measured toy prompts")
    parser.add_argument("--passes", type=int, default=1, help="timed passes over the prompts")
    # one thread: on a shared two-core CPU, two-thread kernels stall whenever another process holds a core
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.dtype=bfloat16")
    args = parser.parse_args()
    args.rounds = args.passes * args.prompts
    return args


def variants(published: list[float], calibrated: list[float]) -> dict[str, tuple[str, float, str, dict]]:
    """label -> (kind, threshold, forecast, cache node)."""
    found = {}

    def add(kind: str, threshold: float, forecast: str, cache: dict) -> None:
        order = {"none": {}, "taylor 1": {"forecast": "taylor", "forecast_order": 1},
                 "taylor 2": {"forecast": "taylor", "forecast_order": 2}}[forecast]
        found[f"{kind} {threshold} {forecast}"] = (kind, threshold, forecast, {**cache, **order})

    for t in FB_THRESHOLDS:
        for forecast in ("none", "taylor 1", "taylor 2"):
            add("fbcache", t, forecast, {"strategy": "fbcache", "residual_diff_threshold": t})
    for forecast in ("none", "taylor 1"):
        add("mbcache F8B0", 0.08, forecast, {"strategy": "mbcache", "residual_diff_threshold": 0.08,
                                             "first_blocks": 8, "last_blocks": 0})
    for name, coefficients, thresholds, fitted_on in (("published", published, TEA_PUBLISHED, None),
                                                      ("calibrated", calibrated, TEA_CALIBRATED, "flux")):
        for t in thresholds:
            for forecast in ("none", "taylor 1"):
                add(f"teacache, {name} coefficients", t, forecast,
                    {"strategy": "teacache", "rel_l1_threshold": t, "coefficients": list(coefficients),
                     "fitted_on": fitted_on})
    return found


def fit_rms(coefficients, pairs: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.poly1d(coefficients)(pairs[:, 0]) - pairs[:, 1]) ** 2)))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg, pipe = load(args)
    size = dict(num_inference_steps=args.steps, height=cfg.model.height, width=cfg.model.width, output_type="np")
    prompts = PROMPTS[:args.prompts]

    published = list(ADAPTERS[cfg.model.architecture].teacache_coefficients(pipe.transformer.config))
    calibration_prompts = toy_prompts()
    calibrated, pairs = calibrate.calibrate(pipe, size, prompts=calibration_prompts, order=ORDER)
    table = variants(published, calibrated)

    generate = lambda prompt: timed(pipe, {**size, "prompt": prompt})  # noqa: E731
    generate(prompts[0])  # warm-up
    ratios: dict[str, list[float]] = {label: [] for label in table}
    base_times, references = [], []
    outputs, stats = {label: [] for label in table}, {label: [] for label in table}
    for pass_ in range(args.passes):
        for prompt in prompts:  # a round: every variant timed right after a baseline of its own
            for label, (_, _, _, cache) in table.items():
                reference, base_seconds = generate(prompt)
                base_times.append(base_seconds)
                with accel.apply(pipe, {"cache": cache}) as run:
                    images, seconds = generate(prompt)
                    if pass_ == 0:
                        outputs[label].append(images)
                        stats[label].append(run.stats()["cache"])
                ratios[label].append(base_seconds / seconds)
            if pass_ == 0:
                references.append(reference)

    reference = np.concatenate(references)
    base = statistics.median(base_times)
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    print(f"{describe(pipe, cfg, args, n_blocks)} (medians); {len(prompts)} toy prompts, seed 0; "
          f"baseline {base:.3f} s per image, task accuracy {task_accuracy(reference, prompts):.2f}")
    print(f"TeaCache coefficients, highest order first. published FLUX: [{', '.join(f'{c:.6g}' for c in published)}] "
          f"(fit RMS on flux_toy's pairs {fit_rms(published, pairs):.4f}); calibrated on flux_toy "
          f"({len(calibration_prompts)} other toy prompts, {len(pairs)} pairs, probe change "
          f"{pairs[:, 0].min():.3f}-{pairs[:, 0].max():.3f}): [{', '.join(f'{c:.6g}' for c in calibrated)}] "
          f"(fit RMS {fit_rms(calibrated, pairs):.4f})")
    print("| cache | threshold | forecast | computed/calls | speedup | PSNR vs baseline (dB) | SSIM | task accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (kind, threshold, forecast, _) in table.items():
        figures = metrics(["psnr", "ssim", "task_accuracy"], np.concatenate(outputs[label]), reference, prompts=prompts)
        computed = sum(s["computed"] for s in stats[label])
        calls = sum(s["calls"] for s in stats[label])
        print(f"| {kind} | {threshold:g} | {forecast} | {computed}/{calls} | "
              f"{statistics.median(ratios[label]):.2f}x | {figures['psnr']:.2f} | {figures['ssim']:.4f} | "
              f"{figures['task_accuracy']:.2f} |")


if __name__ == "__main__":
    main()
