"""The main job: load → apply → warm up → generate → save, with a report of what it measured.

A failure says which stage it stopped in, and the report written so far stays in the run folder.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from accel import report as reports
from accel.api import apply
from accel.errors import AccelError
from accel.models.loading import load_pipeline, resolve_device


class StageFailed(AccelError):
    pass


def generation_kwargs(cfg: DictConfig, pipe) -> dict[str, Any]:
    model = cfg.model
    accepted = inspect.signature(pipe.__call__).parameters
    per_prompt = "num_images_per_prompt" if "num_images_per_prompt" in accepted else "num_videos_per_prompt"
    kwargs = {
        "prompt": cfg.prompt,
        "num_inference_steps": cfg.steps or model.steps,
        "height": cfg.height or model.height,
        "width": cfg.width or model.width,
        per_prompt: cfg.batch_size,
        "output_type": "np",
    }
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else model.guidance_scale
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    frames = cfg.num_frames or model.num_frames
    if frames:
        kwargs["num_frames"] = frames
    if cfg.negative_prompt:
        kwargs["negative_prompt"] = cfg.negative_prompt
    return kwargs


def _generate(pipe, kwargs: dict, seed: int, device: torch.device) -> tuple[np.ndarray, float]:
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same latents on every device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = pipe(**kwargs, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = output.frames if hasattr(output, "frames") else output.images
    return np.asarray(images), time.perf_counter() - start


def _timed_runs(pipe, kwargs, cfg, device) -> tuple[np.ndarray, float, list[float]]:
    """Warm-up calls, then timed ones; returns the last output, the first call's time and the timed ones."""
    first_call, times, output = None, [], None
    for i in range(cfg.warmup + cfg.repeats):
        output, seconds = _generate(pipe, kwargs, cfg.seed, device)
        first_call = seconds if first_call is None else first_call
        if i >= cfg.warmup:
            times.append(seconds)
    return output, first_call, times


def save_outputs(output: np.ndarray, run_dir: Path, stem: str) -> list[str]:
    """Save images as PNG (video frames as an animated GIF), never over an existing file."""
    from PIL import Image

    saved = []
    for index, item in enumerate(output):
        item = (np.clip(item, 0, 1) * 255).round().astype(np.uint8)
        frames = [Image.fromarray(f) for f in item] if item.ndim == 4 else [Image.fromarray(item)]
        suffix = ".gif" if len(frames) > 1 else ".png"
        path = _free_path(run_dir / f"{stem}_{index:02d}{suffix}")
        if len(frames) > 1:
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
        else:
            frames[0].save(path)
        saved.append(path.name)
    return saved


def _free_path(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}.{n}{path.suffix}"), n + 1
    return candidate


def run_job(cfg: DictConfig, run_dir: Path, choices: Optional[dict] = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    report: dict[str, Any] = {
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "environment": reports.environment(device),
        "timings": {},
        "stats": {},
        "outputs": [],
    }
    if choices:
        write_replay_recipe(cfg, choices, run_dir / "recipe.yaml")
    stage = "load"
    try:
        start = time.perf_counter()
        pipe = load_pipeline(cfg.model, cfg.device)
        report["timings"]["load_s"] = time.perf_counter() - start

        stage = "apply"
        start = time.perf_counter()
        run = apply(pipe, cfg)
        report["timings"]["apply_s"] = time.perf_counter() - start

        stage = "generate"
        kwargs = generation_kwargs(cfg, pipe)
        steps = kwargs["num_inference_steps"]
        output, first_call, times = _timed_runs(pipe, kwargs, cfg, device)
        report["timings"]["first_call_s"] = first_call
        report["timings"]["accelerated"] = reports.timing_summary(times, cfg.batch_size, steps)
        report["stats"] = run.stats()

        stage = "save"
        report["outputs"] = save_outputs(output, run_dir, "image")

        if cfg.compare:
            stage = "baseline"
            run.remove()
            reference, _, base_times = _timed_runs(pipe, kwargs, cfg, device)
            base = reports.timing_summary(base_times, cfg.batch_size, steps)
            report["baseline"] = {
                "timings": base,
                "speedup": base["per_image_s"] / report["timings"]["accelerated"]["per_image_s"],
                "quality": reports.quality(output, reference),
            }
            report["outputs"] += save_outputs(reference, run_dir, "baseline")
        else:
            run.remove()
    except Exception as err:
        report["failed_at"] = stage
        report["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
        reports.write_json(run_dir / "report.json", report)
        if isinstance(err, AccelError):
            raise StageFailed(f"stopped during {stage}: {err}\n(report so far: {run_dir / 'report.json'})") from None
        raise
    reports.write_json(run_dir / "report.json", report)
    return report


def write_replay_recipe(cfg: DictConfig, choices: dict, path: Path) -> None:
    """The fully composed recipe as a recipe file: `ACCEL_RECIPES=<run folder> python -m accel recipe=recipe`."""
    groups = [g for g in ("model", "parallel", "cache", "compile") if choices.get(g)]
    lines = ["# The fully composed recipe of this run. Replay it with:",
             f"#   ACCEL_RECIPES={path.parent} python -m accel recipe={path.stem}",
             "defaults:"]
    lines += [f"  - override /{g}: {choices[g]}" for g in groups]
    lines += ["  - _self_", "", OmegaConf.to_yaml(cfg, resolve=True)]
    path.write_text("\n".join(lines))
