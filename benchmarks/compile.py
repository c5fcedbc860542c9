"""The compile stage on a tiny FLUX, measured side by side in one run:

  * scope=blocks against scope=full: cold compile (an empty inductor cache), warm compile (dynamo
    reset, inductor's on-disk cache full), and steady-state time per generation against eager;
  * FBCache under compile against compile alone, compared with the ideal speedup its own hit count
    implies, steps·N / (computed·N + cached) for N blocks (a hit still runs block 0).

Steady-state rounds alternate the variants (apply, generate, remove), so a drifting machine moves
them alike; compiled code stays in dynamo's cache between rounds.

    python benchmarks/compile.py [--rounds 3] [--steps 28] [--model flux_tiny_bench] [--backend inductor] [overrides...]
"""
from __future__ import annotations

import os
import statistics
import tempfile

import torch

import accel
from common import describe, load, parse_args, timed


def main() -> None:
    args = parse_args(__doc__, rounds=3)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="accel-bench-inductor-")  # cold start
    cfg, pipe = load(args)
    prompt_embeds, pooled, _ = pipe.encode_prompt("a red fox in fresh snow", prompt_2=None, device=pipe.device)
    call = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=args.steps,
                height=cfg.model.height, width=cfg.model.width, output_type="latent")

    def generate() -> float:
        return timed(pipe, call)[1]

    compile_ = {"strategy": "torch", "backend": "inductor"}
    variants = {
        "eager": {},
        "compile blocks": {"compile": {**compile_, "scope": "blocks"}},
        "compile full": {"compile": {**compile_, "scope": "full"}},
    }
    first: dict[str, dict[str, float]] = {}
    generate()  # eager warm-up
    for name, recipe in list(variants.items())[1:]:
        for start in ("cold", "warm"):
            torch._dynamo.reset()  # warm: dynamo forgets, inductor's on-disk cache remembers
            with accel.apply(pipe, recipe):
                first.setdefault(name, {})[start] = generate()

    with accel.apply(pipe, {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}}) as run:
        generate()
        diffs = [d for d in run.stats()["cache"]["diffs"][0] if d is not None]
    threshold = statistics.median(diffs)
    variants[f"compile blocks + fbcache@{threshold:.3f}"] = {
        "compile": {**compile_, "scope": "blocks"}, "cache": {"strategy": "fbcache", "residual_diff_threshold": threshold}}
    with accel.apply(pipe, variants[f"compile blocks + fbcache@{threshold:.3f}"]):
        generate()  # compile the cached variant's shapes before timing

    times = {name: [] for name in variants}
    hits = None
    for _ in range(args.rounds):
        for name, recipe in variants.items():
            with accel.apply(pipe, recipe) as run:
                times[name].append(generate())
                hits = run.stats().get("cache", hits)

    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(describe(pipe, cfg, args, n_blocks) + f"; backend {compile_['backend']}")
    print("| variant | cold first call | warm first call | steady median (min-max) | vs eager |")
    print("|---|---|---|---|---|")
    for name in variants:
        cold = f"{first[name]['cold']:.1f} s" if name in first else "-"
        warm = f"{first[name]['warm']:.1f} s" if name in first else "-"
        print(f"| {name} | {cold} | {warm} | {median[name]:.3f} s ({min(times[name]):.3f}-{max(times[name]):.3f}) | "
              f"{median['eager'] / median[name]:.2f}x |")
    ideal = args.steps * n_blocks / (hits["computed"] * n_blocks + hits["cached"])
    measured = median["compile blocks"] / median[list(variants)[-1]]
    print(f"fbcache under compile: {hits['computed']} computed, {hits['cached']} cached; speedup over compile alone "
          f"{measured:.3f}x, ideal {ideal:.3f}x, efficiency {100 * measured / ideal:.1f} % (aim >= 95 %)")


if __name__ == "__main__":
    main()
