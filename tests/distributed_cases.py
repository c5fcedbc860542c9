"""Run under torchrun by tests/test_parallel.py: each case generates once on every rank alone (the
reference) and once with the parallel recipe, and rank 0 writes what it saw to a JSON file.

    torchrun --nproc_per_node=N tests/distributed_cases.py RESULTS.json CASE [CASE ...]
    torchrun --nproc_per_node=2 tests/distributed_cases.py - die:1     # rank 1 dies during step 2
    torchrun --nproc_per_node=2 tests/distributed_cases.py - stall:1   # rank 1 stalls during step 2
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import accel
from accel.families import FAMILIES
from tests.helpers import generate, tiny_option, tiny_pipeline

FBCACHE = {"strategy": "fbcache", "residual_diff_threshold": 0.4}
EAGER_COMPILE = {"strategy": "torch", "backend": "eager"}
VIDEO = {"height": 32, "width": 32, "num_frames": 5}
# name: (model, parallel degrees, other stages, generation options). Every sequence-parallel family gets
# "<family>_ulysses" (FBCache over a 2-way Ulysses split at its tiny size); the rest are the cases that
# need their own set-up (ring, padding, CFG, compile, masks, 4 ranks).
CASES = {
    **{f"{name}_ulysses": (tiny_option(name), {"ulysses": 2}, {"cache": FBCACHE}, FAMILIES[name].tiny_call)
       for name, family in sorted(FAMILIES.items()) if family.adapter.sequence is not None},
    "flux_ring": ("flux_tiny", {"ring": 2}, {"cache": FBCACHE}, {}),
    "flux_ulysses_compiled": ("flux_tiny", {"ulysses": 2}, {"cache": FBCACHE, "compile": EAGER_COMPILE}, {}),
    "flux_true_cfg": ("flux_tiny", {"cfg": 2}, {"cache": FBCACHE},
                      {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),
    "sd35_ulysses_padded": ("sd35_tiny", {"ulysses": 2}, {"cache": FBCACHE}, {}),
    "sd35_cfg_batched": ("sd35_tiny", {"cfg": 2}, {"cache": FBCACHE}, {}),
    "wan_cfg": ("wan_tiny", {"cfg": 2}, {"cache": FBCACHE}, VIDEO),
    "hunyuan_ring_masked": ("hunyuan_video_tiny", {"ring": 2}, {"cache": FBCACHE}, VIDEO),
    "flux_ulysses_ring": ("flux_tiny", {"ulysses": 2, "ring": 2}, {"cache": FBCACHE}, {}),
    "flux_cfg_ulysses": ("flux_tiny", {"cfg": 2, "ulysses": 2}, {"cache": FBCACHE},
                         {"negative_prompt": "blurry", "true_cfg_scale": 4.0}),
    "wan_ulysses_ring": ("wan_tiny", {"ulysses": 2, "ring": 2}, {}, VIDEO),
}
STEPS = 4


def run_case(pipes: dict, name: str) -> dict:
    model, degrees, stages, options = CASES[name]
    if model not in pipes:
        pipes[model] = tiny_pipeline(model)
        pipes[model].set_progress_bar_config(disable=True)
    pipe = pipes[model]
    options = {"num_inference_steps": STEPS, **options}
    with accel.apply(pipe, stages) as run:
        reference = generate(pipe, **options)
        reference_hits = run.stats().get("cache", {}).get("hit_map")
        reference_diffs = run.stats().get("cache", {}).get("diffs")
    torch._dynamo.reset()
    with accel.apply(pipe, {**stages, "parallel": {"strategy": "mesh", **degrees}}) as run:
        output = generate(pipe, **options)
        stats = run.stats()
    torch._dynamo.reset()
    seen = {"max_abs_diff": (output - reference).abs().max().item(), "reference_hits": reference_hits,
            "hits": stats.get("cache", {}).get("hit_map"), "parallel": stats["parallel"],
            "reference_diffs": reference_diffs, "diffs": stats.get("cache", {}).get("diffs"),
            "graph_breaks": stats.get("compile", {}).get("graph_breaks")}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    return {"ranks": everyone}


def fail_during_step_2(pipe, how: str, rank: int) -> None:
    """Rank `rank` dies (exit code 17) or stalls for a minute at step 2; the process group is accel's own,
    started from torchrun's environment with parallel.timeout_s=5."""
    import time

    def callback(pipeline, step, timestep, kwargs):
        if step == 2 and dist.get_rank() == rank:
            if how == "die":
                os._exit(17)
            time.sleep(60)
        return kwargs

    with accel.apply(pipe, {"parallel": {"strategy": "mesh", "ulysses": 2, "timeout_s": 5}}):
        generate(pipe, num_inference_steps=STEPS, callback_on_step_end=callback)


def main() -> None:
    torch.set_num_threads(1)
    results_path, cases = sys.argv[1], sys.argv[2:]
    if cases[0].split(":")[0] in ("die", "stall"):
        how, rank = cases[0].split(":")
        pipe = tiny_pipeline("flux_tiny")
        pipe.set_progress_bar_config(disable=True)
        fail_during_step_2(pipe, how, int(rank))
        return
    dist.init_process_group("gloo")
    pipes: dict = {}
    results = {name: run_case(pipes, name) for name in cases}
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
