"""Every cache kind on a tiny FLUX at several thresholds: speedup and PSNR against the baseline,
measured side by side in one run, printed as one Markdown table.

Random weights: the first-block diffs of a random model (~0.3-0.5 per step) are unlike a real one's,
so published thresholds never hit here. Thresholds are therefore taken from the diffs this model
shows at threshold 0 (quantiles for FBCache/MBCache, multiples of the median rescaled step change
for TeaCache). The table measures mechanics (hits → time, and the error each kind and forecast adds),
not the quality a real model would keep.

    python benchmarks/cache_table.py [--rounds 3] [--steps 28] [--model flux_tiny_bench] [overrides...]
"""
from __future__ import annotations

import statistics

import numpy as np

import accel
from accel.families import ADAPTERS
from accel.report import quality
from common import describe, load, parse_args, timed


def main() -> None:
    args = parse_args(__doc__, rounds=3)
    cfg, pipe = load(args)
    call = dict(prompt="a red fox in fresh snow", num_inference_steps=args.steps, height=cfg.model.height,
                width=cfg.model.width, output_type="np")

    def generate():
        return timed(pipe, call)

    def observed_diffs(cache: dict) -> list[float]:
        with accel.apply(pipe, {"cache": cache}) as run:
            generate()
            return [d for d in run.stats()["cache"]["diffs"][0] if d is not None]

    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    fn, bn = max(1, n_blocks // 8), max(1, n_blocks // 12)
    fb_diffs = observed_diffs({"strategy": "fbcache", "residual_diff_threshold": 0.0})
    mb_diffs = observed_diffs({"strategy": "mbcache", "residual_diff_threshold": 0.0, "first_blocks": fn, "last_blocks": bn})
    tea_diffs = observed_diffs({"strategy": "teacache", "rel_l1_threshold": 0.0})
    rescale = np.poly1d(ADAPTERS["flux"].teacache_coefficients(pipe.transformer.config))
    tea_step = statistics.median(abs(float(rescale(d))) for d in tea_diffs)

    variants: dict[str, dict] = {}
    for q in (0.25, 0.5, 0.75):
        t = float(np.quantile(fb_diffs, q))
        for forecast in ("none", "taylor"):
            variants[f"fbcache {t:.3f} {forecast}"] = {"strategy": "fbcache", "residual_diff_threshold": t, "forecast": forecast}
        t = float(np.quantile(mb_diffs, q))
        variants[f"mbcache F{fn}B{bn} {t:.3f}"] = {"strategy": "mbcache", "residual_diff_threshold": t,
                                                   "first_blocks": fn, "last_blocks": bn}
    for k in (1.5, 2.5, 4.0):
        t = k * tea_step
        for forecast in ("none", "taylor"):
            variants[f"teacache {t:.3f} {forecast}"] = {"strategy": "teacache", "rel_l1_threshold": t, "forecast": forecast}

    generate()  # warm-up
    reference, _ = generate()
    times = {"baseline": [], **{name: [] for name in variants}}
    results = {}
    for _ in range(args.rounds):
        times["baseline"].append(generate()[1])
        for name, cache in variants.items():
            with accel.apply(pipe, {"cache": cache}) as run:
                images, seconds = generate()
                times[name].append(seconds)
                results[name] = (images, run.stats()["cache"])

    base = statistics.median(times["baseline"])
    print(f"{describe(pipe, cfg, args, n_blocks)} (medians); baseline {base:.3f} s per image")
    print("| cache | threshold | forecast | computed/cached | speedup | PSNR vs baseline (dB) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for label, cache in variants.items():
        images, stats = results[label]
        q = quality(["psnr", "max_abs"], images, reference)
        threshold = cache.get("residual_diff_threshold", cache.get("rel_l1_threshold"))
        kind = label.split(" ")[0] + (f" {label.split(' ')[1]}" if cache["strategy"] == "mbcache" else "")
        print(f"| {kind} | {threshold:.3f} | {cache.get('forecast', 'none')} | {stats['computed']}/{stats['cached']} | "
              f"{base / statistics.median(times[label]):.2f}x | {q['psnr']:.2f} | {q['max_abs']:.4f} |")


if __name__ == "__main__":
    main()
