"""What the benchmark scripts share: arguments, the pipeline under test, and a timed generation."""
from __future__ import annotations

import argparse
import time

import torch

import accel


def parse_args(doc: str, rounds: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="flux_tiny_bench")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.dtype=bfloat16")
    return parser.parse_args()


def load(args: argparse.Namespace):
    """The composed recipe and its pipeline, progress bars off."""
    cfg = accel.compose(None, [f"model={args.model}", *args.overrides])
    pipe = accel.load_pipeline(cfg.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    return cfg, pipe


def timed(pipe, call: dict) -> tuple[object, float]:
    """One generation from seed 0: its images (or latents) and its wall time, device work included."""
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    if cuda:
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def describe(pipe, cfg, args, n_blocks: int) -> str:
    device = pipe.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return (f"device {name}; model {args.model} {' '.join(args.overrides)} ({n_blocks} blocks, {cfg.model.dtype}); "
            f"{args.steps} steps; {args.rounds} rounds")
