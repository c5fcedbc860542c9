"""What a run measured: timings, quality against the baseline, environment; as report.json and a table."""
from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    import accel

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "accel": accel.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
    }


def quality(output: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """PSNR (dB, on [0, 1] pixels) and max-abs difference of an output against the baseline's."""
    diff = output.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff**2))
    return {
        "psnr_db": "inf" if mse == 0 else round(10 * math.log10(1.0 / mse), 3),
        "max_abs_diff": float(np.max(np.abs(diff))),
        "identical": mse == 0,
    }


def timing_summary(seconds: list[float], images: int, steps: int) -> dict[str, float]:
    per_image = statistics.median(seconds) / images
    return {"per_image_s": round(per_image, 5), "per_step_s": round(per_image / steps, 6),
            "runs_s": [round(s, 5) for s in seconds]}


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _hit_map(stats: dict) -> Optional[str]:
    maps = stats.get("cache", {}).get("hit_map")
    return " | ".join(maps) if maps else None


def summary_table(report: dict) -> str:
    timings = report["timings"]
    rows = [
        ("model", f"{report['recipe']['model']['architecture']} ({report['recipe']['model']['source']})"),
        ("strategies", ", ".join(f"{s}={v['strategy']}" for s, v in report["stats"].items()) or "none"),
        ("load", f"{timings['load_s']:.2f} s"),
        ("apply", f"{timings['apply_s'] * 1000:.1f} ms"),
        ("first call", f"{timings['first_call_s']:.3f} s"),
        ("per image", f"{timings['accelerated']['per_image_s']:.4f} s"),
        ("per step", f"{timings['accelerated']['per_step_s'] * 1000:.2f} ms"),
    ]
    cache = report["stats"].get("cache")
    if cache and "computed" in cache:
        rows.append(("cache", f"{cache['computed']} computed, {cache['cached']} cached of {cache['calls']} calls"))
        rows.append(("hit map", _hit_map(report["stats"])))
    if "baseline" in report:
        base = report["baseline"]
        rows.append(("baseline/image", f"{base['timings']['per_image_s']:.4f} s"))
        rows.append(("speedup", f"{base['speedup']:.2f}x"))
        rows.append(("PSNR vs baseline", f"{base['quality']['psnr_db']} dB"))
        rows.append(("max abs diff", f"{base['quality']['max_abs_diff']:.4g}"))
    rows.append(("outputs", ", ".join(report["outputs"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
