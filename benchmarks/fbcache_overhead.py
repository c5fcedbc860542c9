"""FBCache cost and benefit on a heavy tiny FLUX, measured side by side in one run.

Prints, from interleaved rounds of the same denoising loop (prompt embeddings precomputed, latent
output, so the loop is the transformer alone):
  * hook overhead: FBCache at threshold 0 (never hits) against the plain pipeline;
  * efficiency at a caching threshold: measured speedup against the ideal speedup its own hit count
    implies, steps·N / (computed·N + cached·1) for N blocks (a hit still runs block 0).

The caching threshold is the median first-block diff seen at threshold 0, so about half the steps
can hit. Random weights make it unlike a real model's threshold; it measures mechanics, not quality.

    python benchmarks/fbcache_overhead.py [--rounds 5] [--steps 28] [--model flux_tiny_bench] [overrides...]

Overrides are recipe overrides, e.g. `model.dtype=bfloat16 model.tiny.num_layers=19`.
"""
from __future__ import annotations

import statistics

import torch

import accel
from common import describe, load, parse_args, timed


def main() -> None:
    args = parse_args(__doc__, rounds=5)
    cfg, pipe = load(args)
    prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox in fresh snow", prompt_2=None, device=pipe.device)
    call = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=args.steps,
                height=cfg.model.height, width=cfg.model.width, output_type="latent")

    def loop() -> float:
        loop.latents, seconds = timed(pipe, call)
        return seconds

    loop()
    plain_latents = loop.latents
    with accel.apply(pipe, {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}}) as run:
        loop()
        diffs = [d for d in run.stats()["cache"]["diffs"][0] if d is not None]
    identical = torch.equal(loop.latents, plain_latents)
    threshold = statistics.median(diffs)

    variants = {
        "plain": None,
        "fbcache@0": {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}},
        f"fbcache@{threshold:.3f}": {"cache": {"strategy": "fbcache", "residual_diff_threshold": threshold}},
    }
    times = {name: [] for name in variants}
    stats = {}
    loop()  # warm-up
    for _ in range(args.rounds):
        for name, recipe in variants.items():
            if recipe is None:
                times[name].append(loop())
                continue
            with accel.apply(pipe, recipe) as run:
                times[name].append(loop())
                stats[name] = run.stats()["cache"]

    median = {name: statistics.median(t) for name, t in times.items()}
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    plain, never, caching = median.values()
    hit = stats[list(variants)[2]]
    ideal = args.steps * n_blocks / (hit["computed"] * n_blocks + hit["cached"])
    measured = plain / caching
    print(describe(pipe, cfg, args, n_blocks))
    print(f"threshold 0 output identical to plain: {identical}")
    for name in variants:
        print(f"  {name:<16} median {median[name]:.3f} s   (min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    print(f"hook overhead at threshold 0:  {100 * (never / plain - 1):+.2f} %  (aim <= 2 %)")
    print(f"at threshold {threshold:.3f}: {hit['computed']} computed, {hit['cached']} cached, map {hit['hit_map'][0]}")
    print(f"  speedup {measured:.3f}x, ideal {ideal:.3f}x, efficiency {100 * measured / ideal:.1f} % of ideal (aim >= 95 %)")


if __name__ == "__main__":
    main()
