"""The main job: load → apply → warm up → generate → save, with a report of what it measured.

With compare=true the unaccelerated baseline is warmed up too, and the two are timed in alternating
rounds, so a drifting machine moves both alike. A failure says which stage it stopped in, and the
report written so far stays in the run folder.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from accel import registry
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


def timed_generation(pipe, kwargs: dict, seed: int, device: torch.device) -> tuple[np.ndarray, float, Any]:
    """One generation: its decoded output, its seconds, and its final latents (None where the pipeline
    offers no step callback)."""
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same latents on every device
    latents = {}

    def keep_latents(pipe, step, timestep, tensors):
        latents["final"] = tensors["latents"]
        return tensors

    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        kwargs = {**kwargs, "callback_on_step_end": keep_latents}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = pipe(**kwargs, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    images = output.frames if hasattr(output, "frames") else output.images
    final = latents.get("final")
    return np.asarray(images), seconds, None if final is None else final.float().cpu().numpy()


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


def quiet_loading() -> None:
    """Loading bars per component and per weight file say nothing a run's report does not; the
    denoising progress bar stays."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def run_job(cfg: DictConfig, run_dir: Path) -> dict:
    """Load, apply, warm up, generate (interleaved with the baseline under compare=true), save."""
    device = resolve_device(cfg.device)
    report: dict[str, Any] = {
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "environment": reports.environment(device),
        "timings": {},
        "stats": {},
        "outputs": [],
    }
    from accel.parallel import mesh as meshes

    writes = meshes.launched_rank() == 0  # with several processes, only rank 0 writes images and the report
    if writes:
        write_replay_recipe(cfg, run_dir / "recipe.yaml")
    repeats = cfg.repeats or (3 if cfg.compare else 1)
    stage = "load"
    try:
        quiet_loading()
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

        def generate():
            return timed_generation(pipe, kwargs, cfg.seed, device)

        first_call = None
        for _ in range(cfg.warmup):
            _, seconds, _ = generate()
            first_call = first_call or seconds
        if cfg.compare:  # the baseline gets its own warm-up, then the two alternate round by round
            stage = "baseline"
            run.remove()
            for _ in range(cfg.warmup):
                generate()
        times: dict[str, list[float]] = {"accelerated": [], "baseline": []}
        for _ in range(repeats):
            if cfg.compare:
                stage = "baseline"
                reference, seconds, reference_latents = generate()
                times["baseline"].append(seconds)
                stage = "apply"
                run = apply(pipe, cfg)
            stage = "generate"
            output, seconds, latents = generate()
            times["accelerated"].append(seconds)
            first_call = first_call or seconds
            report["stats"] = run.stats()
            if cfg.compare:
                run.remove()
        run.remove()
        report["timings"]["first_call_s"] = first_call
        report["timings"]["accelerated"] = reports.timing_summary(times["accelerated"], cfg.batch_size, steps)
        # what the first call cost beyond a steady one: compilation, autotuning, allocator warm-up
        steady = report["timings"]["accelerated"]["per_image_s"] * cfg.batch_size
        report["timings"]["first_call_extra_s"] = round(first_call - steady, 5)

        if meshes.launched_world_size() > 1:
            stage = "gather"
            report["ranks"] = _per_rank_timings(times["accelerated"], cfg.batch_size, steps)

        stage = "save"
        if writes:
            report["outputs"] = save_outputs(output, run_dir, "image")
        if cfg.compare:
            stage = "quality"
            figures = reports.quality(cfg.metrics, output, reference, prompts=cfg.prompt, latents=latents,
                                      reference_latents=reference_latents)
            report["baseline"] = reports.comparison(times["baseline"], times["accelerated"], cfg.batch_size, steps,
                                                    figures)
            if writes:
                report["outputs"] += save_outputs(reference, run_dir, "baseline")
    except Exception as err:
        report["failed_at"] = stage
        report["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = f" on rank {meshes.launched_rank()}" if meshes.launched_world_size() > 1 else ""
        if writes:
            reports.write_json(run_dir / "report.json", report)
        if isinstance(err, AccelError):
            raise StageFailed(f"stopped during {stage}{where}: {err}\n(report so far: {run_dir / 'report.json'})") from None
        if where and isinstance(err, (RuntimeError, torch.distributed.DistError)):
            # a collective that failed or timed out: another rank died or stalled
            raise StageFailed(f"stopped during {stage}{where}: a collective across the ranks failed ({report['error']}); "
                              "another rank stopped or stalled longer than parallel.timeout_s") from None
        raise
    finally:
        meshes.shutdown()
    if writes:
        reports.write_json(run_dir / "report.json", report)
    return report


def _per_rank_timings(seconds: list[float], images: int, steps: int) -> list[dict]:
    """Every rank's timings, gathered to every rank (rank 0 reports them)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, seconds)
    return [{"rank": rank, **reports.timing_summary(times, images, steps)} for rank, times in enumerate(gathered)]


def write_replay_recipe(cfg: DictConfig, path: Path, header: Sequence[str] = ()) -> None:
    """The fully composed recipe as a recipe file that replays on its own (every value embedded, no
    search path needed): `ACCEL_RECIPES=<run folder> python -m accel recipe=recipe`. `header`: lines
    of comment above it (what the recipe is and the evidence for it)."""
    lines = [f"# {line}" for line in header] or ["# The fully composed recipe of this run."]
    lines += ["# Replay it with:",
             f"#   ACCEL_RECIPES={path.parent} python -m accel recipe={path.stem}",
             "defaults:",
             "  - override /model: null  # the model's every field is below"]
    lines += [f"  - override /{stage}: {cfg[stage].strategy}" for stage in registry.STAGES]
    lines += ["  - _self_", "", OmegaConf.to_yaml(cfg, resolve=True)]
    path.write_text("\n".join(lines))
