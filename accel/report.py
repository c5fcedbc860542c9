"""What a run measured: timings, quality against the baseline, environment; as report.json and a table."""
from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from accel import metrics


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "accel": importlib.metadata.version("accel"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
    }


def quality(names, output: np.ndarray, reference: np.ndarray, prompts=None, latents=None,
            reference_latents=None) -> dict[str, Any]:
    """The named metrics (accel.metrics; None: every one that applies) of an output against the
    baseline's, with the baseline's own task accuracy beside the output's where the task applies."""
    figures = metrics.metrics(names, output, reference, prompts=prompts, latents=latents,
                              reference_latents=reference_latents)
    if figures.get("task_accuracy") is not None:
        figures["baseline_task_accuracy"] = metrics.task_accuracy(reference, prompts)
    figures["identical"] = bool(np.array_equal(output, reference))
    return figures


def timing_summary(seconds: list[float], images: int, steps: int) -> dict[str, Any]:
    """Median, min and max seconds per image (and the median per step) over timed generations."""
    per_image = [t / images for t in seconds]
    median = statistics.median(per_image)
    return {"per_image_s": round(median, 5), "min_s": round(min(per_image), 5), "max_s": round(max(per_image), 5),
            "per_step_s": round(median / steps, 6), "runs_s": [round(t, 5) for t in seconds]}


def comparison(baseline_s: list[float], accelerated_s: list[float], images: int, steps: int,
               figures: dict[str, Any]) -> dict[str, Any]:
    """Baseline against accelerated, from alternating rounds: the speedup of the medians, the range
    it could be, and whether the difference is measurable at all (the two ranges do not overlap)."""
    base, fast = timing_summary(baseline_s, images, steps), timing_summary(accelerated_s, images, steps)
    return {
        "timings": base,
        "speedup": round(base["per_image_s"] / fast["per_image_s"], 3),
        "speedup_range": [round(base["min_s"] / fast["max_s"], 3), round(base["max_s"] / fast["min_s"], 3)],
        # one round each cannot tell a speedup from noise; more must not overlap
        "measurable": len(accelerated_s) > 1 and (fast["max_s"] < base["min_s"] or base["max_s"] < fast["min_s"]),
        "rounds": len(accelerated_s),
        "quality": figures,
    }


def write_json(path: Path, report: dict) -> None:
    """JSON with infinite figures (PSNR of identical outputs) as the string "inf", as JSON has no inf."""
    path.write_text(json.dumps(_finite(report), indent=2, default=str) + "\n")


def _finite(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _seconds(timing: dict) -> str:
    runs = len(timing["runs_s"])
    spread = f" (min {timing['min_s']:.4f}, max {timing['max_s']:.4f}, {runs} runs)" if runs > 1 else ""
    return f"{timing['per_image_s']:.4f} s{spread}"


def cache_note(cache: dict) -> Optional[str]:
    """When a cache hit nothing or almost nothing: the distances its probe saw, and a threshold that
    would cache about half the steps."""
    if "computed" not in cache or cache["cached"] > 0.1 * cache["calls"]:
        return None
    seen = sorted(d for branch in cache.get("diffs", []) for d in branch if d is not None)
    note = f"cached {cache['cached']} of {cache['calls']} calls"
    threshold = cache.get("threshold")
    if not seen or not threshold:
        return note
    note += (f": the probe's distances were {seen[0]:.4g}-{seen[-1]:.4g} (median {statistics.median(seen):.4g}) "
             f"against {threshold['name']}={threshold['value']:g}")
    if threshold.get("caches_about_half") is not None:
        note += f"; cache.{threshold['name']}={threshold['caches_about_half']:.3g} would cache about half the steps"
    return note


QUALITY_LABELS = {  # the table's words for accel.metrics' figures, in the table's order
    "psnr": ("PSNR", "{:.2f} dB"), "ssim": ("SSIM", "{:.4f}"), "lpips": ("LPIPS", "{:.4f}"),
    "mean_abs": ("mean abs", "{:.4g}"), "max_abs": ("max abs", "{:.4g}"),
    "frame_psnr": ("per-frame PSNR", None), "flicker": ("flicker", "{:.4g}"),
    "latent_relative_l2": ("rel L2", "{:.4g}"), "latent_mean_abs": ("mean abs", "{:.4g}"),
    "latent_max_abs": ("max abs", "{:.4g}"), "task_accuracy": ("task accuracy", "{:.2f}"),
}


def format_figure(name: str, value) -> str:
    if value is None:
        return "n/a"
    if name == "frame_psnr":
        return " ".join(f"{v:.1f}" for v in value) + " dB"
    if isinstance(value, float) and math.isinf(value):
        return "inf (identical)" if name == "psnr" else "inf"
    return QUALITY_LABELS[name][1].format(value)


def quality_rows(figures: dict) -> list[tuple[str, str]]:
    """Table rows of a comparison's quality figures: one line for the image, one for latents and
    the task, and what could not be computed and why."""
    def line(names):
        return ", ".join(f"{QUALITY_LABELS[n][0]} {format_figure(n, figures[n])}" for n in names
                         if figures.get(n) is not None)

    image = line(["psnr", "ssim", "lpips", "mean_abs", "max_abs", "frame_psnr", "flicker"])
    identical = "bit-identical" if figures.get("identical") else ""
    rows = [("vs baseline", f"{image} ({identical})" if image and identical else image or identical)]
    rows = [row for row in rows if row[1]]
    latents = line(["latent_relative_l2", "latent_mean_abs", "latent_max_abs"])
    if latents:
        rows.append(("latents", latents))
    if figures.get("task_accuracy") is not None:
        rows.append(("task accuracy", f"{figures['task_accuracy']:.2f} (baseline "
                                      f"{figures['baseline_task_accuracy']:.2f})"))
    for name, why in figures.get("unavailable", {}).items():
        rows.append(("not computed", f"{name}: {why}"))
    return rows


def summary_table(report: dict) -> str:
    timings = report["timings"]
    rows = [
        ("model", f"{report['recipe']['model']['architecture']} ({report['recipe']['model']['source']})"),
        ("strategies", ", ".join(f"{s}={v['strategy']}" for s, v in report["stats"].items()) or "none"),
        ("load", f"{timings['load_s']:.2f} s"),
        ("apply", f"{timings['apply_s'] * 1000:.1f} ms"),
        ("first call", f"{timings['first_call_s']:.3f} s " + (
            f"({timings['first_call_extra_s']:.3f} s over a steady one: compilation, warm-up)"
            if timings["first_call_extra_s"] > 0 else "(no slower than a steady one)")),
        ("per image", _seconds(timings["accelerated"])),
        ("per step", f"{timings['accelerated']['per_step_s'] * 1000:.2f} ms"),
    ]
    quant = report["stats"].get("quant")
    if quant and "param_bytes_before" in quant:
        rows.append(("quant", f"{quant['kind']}: {quant['layers_quantized']} of {quant['linear_layers']} linear layers; "
                              f"denoiser weights {quant['param_bytes_before'] / 2**20:.1f} -> "
                              f"{quant['param_bytes_after'] / 2**20:.1f} MiB"))
    compiled = report["stats"].get("compile")
    if compiled and "graphs" in compiled:
        rows.append(("compile", f"{compiled['scope']} ({compiled['backend']}): {compiled['graphs']} graphs, "
                                f"{compiled['graph_breaks']} graph breaks, {compiled['recompiles']} recompiles"))
    parallel = report["stats"].get("parallel")
    if parallel and parallel.get("world_size", 1) > 1:
        degrees = " × ".join(f"{name} {size}" for name, size in parallel["degrees"].items() if size > 1)
        per_rank = ", ".join(f"rank {r['rank']} {r['per_image_s']:.4f} s" for r in report.get("ranks", []))
        rows.append(("parallel", f"{degrees} over {parallel['world_size']} ranks ({parallel['backend']}); "
                                 f"per image: {per_rank}"))
    cache = report["stats"].get("cache")
    if cache and "computed" in cache:
        rows.append(("cache", f"{cache['computed']} computed, {cache['cached']} cached of {cache['calls']} calls"))
        rows.append(("hit map", " | ".join(cache["hit_map"])))
        note = cache_note(cache)
        if note:
            rows.append(("cache note", note))
    if "baseline" in report:
        base = report["baseline"]
        rows.append(("baseline/image", _seconds(base["timings"])))
        low, high = base["speedup_range"]
        if base["measurable"]:
            rows.append(("speedup", f"{base['speedup']:.2f}x (range {low:.2f}-{high:.2f}x over {base['rounds']} rounds)"))
        else:
            why = (f"the ranges of {base['rounds']} alternating rounds overlap" if base["rounds"] > 1 else
                   "one round cannot tell it from noise: repeats=3 or more")
            rows.append(("speedup", f"no measurable difference ({base['speedup']:.2f}x median; {why})"))
        rows += quality_rows(base["quality"])
    if report.get("recipe_file"):
        rows.append(("recipe file", report["recipe_file"]))
    rows.append(("outputs", ", ".join(report["outputs"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
