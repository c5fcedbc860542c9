"""On a given device, for every embedded tiny model: a cache that never hits gives the baseline bit
for bit, a caching one hits, and remove() gives the baseline back. For checking a GPU set-up.

    python benchmarks/exactness.py [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch

import accel

MODELS = {"flux_tiny": {}, "sd35_tiny": {}, "sdxl_tiny": {}, "wan_tiny": {"num_frames": 5},
          "hunyuan_video_tiny": {"num_frames": 5}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    for name, extra in MODELS.items():
        cfg = accel.compose(None, [f"model={name}", f"model.dtype={args.dtype}"])
        pipe = accel.load_pipeline(cfg.model, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        call = dict(prompt="a red fox", num_inference_steps=8, height=cfg.model.height, width=cfg.model.width,
                    output_type="pt", **extra)

        def generate():
            output = pipe(**call, generator=torch.Generator("cpu").manual_seed(0))
            return output.frames if hasattr(output, "frames") else output.images

        baseline = generate()
        with accel.apply(pipe, {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}}):
            off = torch.equal(generate(), baseline)
        with accel.apply(pipe, {"cache": {"strategy": "fbcache", "residual_diff_threshold": 1e9}}) as run:
            cached = generate()
            hits = run.stats()["cache"]["cached"]
        restored = torch.equal(generate(), baseline)
        drift = (cached.float() - baseline.float()).abs().max().item()
        print(f"{name:<20} {pipe.device} {args.dtype}: off==baseline {off}, hits {hits}, "
              f"max|cached-baseline| {drift:.4f}, restored {restored}")


if __name__ == "__main__":
    main()
