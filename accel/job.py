"""The main job: load → apply → warm up → generate → save, with a report of what it measured.

With compare=true the unaccelerated baseline is warmed up too, and the two are timed in alternating
rounds, so a drifting machine moves both alike. A failure (or Ctrl-C) says which stage it stopped in,
and the report written so far stays in the run folder.
"""
from __future__ import annotations

import inspect
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from accel import report as reports
from accel.api import apply, load_pipeline
from accel.errors import AccelError, Interrupted
from accel.models.loading import resolve_device
from accel.parallel import mesh as meshes
from accel.recipe import Recipe
from accel.strategies.parallel import MeshConfig


class StageFailed(AccelError):
    pass


def generation_kwargs(recipe: Recipe, pipe) -> dict[str, Any]:
    accepted = inspect.signature(pipe.__call__).parameters
    per_prompt = "num_images_per_prompt" if "num_images_per_prompt" in accepted else "num_videos_per_prompt"
    kwargs = {
        "prompt": recipe.job.prompt,
        "num_inference_steps": recipe.steps,
        "height": recipe.height,
        "width": recipe.width,
        per_prompt: recipe.job.batch_size,
        "output_type": "np",
    }
    if recipe.guidance_scale is not None:
        kwargs["guidance_scale"] = recipe.guidance_scale
    if recipe.num_frames:
        kwargs["num_frames"] = recipe.num_frames
    if recipe.job.negative_prompt:
        kwargs["negative_prompt"] = recipe.job.negative_prompt
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


class _TruncationNotes(logging.Filter):
    """Drops the text encoders' warnings about a long prompt (one per encoder and per generation, each
    with the whole cut-off text): the job says it once itself (`prompt_note`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "truncated because" not in message and "longer than the specified maximum sequence" not in message


def prompt_note(pipe, prompt: str) -> Optional[str]:
    """One line when the prompt is longer than a text encoder reads, naming each encoder's limit."""
    cut = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
            continue
        tokens = len(tokenizer(prompt, truncation=False)["input_ids"])
        if tokens > limit:
            cut.append(f"{type(tokenizer).__name__} reads {limit} of its {tokens} tokens")
    if not cut:
        return None
    return f"accel: note: the prompt ({len(prompt):,} characters) is longer than the text encoders read: {'; '.join(cut)}"


def quiet_loading() -> None:
    """Loading bars per component and per weight file say nothing a run's report does not; the
    denoising progress bar stays. A long prompt is said once, by the job."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for library in (diffusers, transformers):
        for handler in library.utils.logging._get_library_root_logger().handlers:
            if not any(isinstance(f, _TruncationNotes) for f in handler.filters):
                handler.addFilter(_TruncationNotes())


class _Progress:
    """Labels the pipeline's progress bar: which variant, which round."""

    def __init__(self, pipe, rounds: int):
        self.pipe, self.rounds = pipe, rounds

    def __call__(self, variant: str, round_: Optional[int] = None) -> None:
        which = "warm-up" if round_ is None else f"round {round_ + 1}/{self.rounds}"
        self.pipe.set_progress_bar_config(desc=f"{variant} ({which})", leave=False)


def run_job(recipe: Recipe, run_dir: Path) -> dict:
    """Load, apply, warm up, generate (interleaved with the baseline under compare=true), save."""
    job = recipe.job
    device = resolve_device(job.device)
    report: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "recipe_file": recipe.recipe_file,
        "environment": reports.environment(device),
        "timings": {},
        "stats": {},
        "outputs": [],
    }
    writes = meshes.launched_rank() == 0  # with several processes, only rank 0 writes images and the report
    if writes:
        write_replay_recipe(recipe, run_dir / "recipe.yaml")
    repeats = job.repeats or (3 if job.compare else 1)
    stage, mesh = "load", None
    try:
        quiet_loading()
        start = time.perf_counter()
        pipe = load_pipeline(recipe.model, job.device)
        report["timings"]["load_s"] = time.perf_counter() - start
        if isinstance(recipe.parallel, MeshConfig):  # one mesh for the whole run: every round applies on it
            stage = "parallel"
            mesh = meshes.join(recipe.parallel.degrees, recipe.parallel.backend, recipe.parallel.timeout_s, device)

        stage = "apply"
        start = time.perf_counter()
        run = apply(pipe, recipe, mesh=mesh)
        report["timings"]["apply_s"] = time.perf_counter() - start

        stage = "generate"
        kwargs = generation_kwargs(recipe, pipe)
        note = prompt_note(pipe, job.prompt) if writes else None
        if note:
            print(note, file=sys.stderr)
        progress = _Progress(pipe, repeats)
        accelerated = "accelerated" if job.compare else "generation"

        def generate():
            return timed_generation(pipe, kwargs, job.seed, device)

        first_call = None
        for _ in range(job.warmup):
            progress(accelerated)
            _, seconds, _ = generate()
            first_call = first_call or seconds
        if job.compare:  # the baseline gets its own warm-up, then the two alternate round by round
            stage = "baseline"
            run.remove()
            for _ in range(job.warmup):
                progress("baseline")
                generate()
        times: dict[str, list[float]] = {"accelerated": [], "baseline": []}
        for round_ in range(repeats):
            if job.compare:
                stage = "baseline"
                progress("baseline", round_)
                reference, seconds, reference_latents = generate()
                times["baseline"].append(seconds)
                stage = "apply"
                run = apply(pipe, recipe, mesh=mesh)
            stage = "generate"
            progress(accelerated, round_)
            output, seconds, latents = generate()
            times["accelerated"].append(seconds)
            first_call = first_call or seconds
            report["stats"] = run.stats()
            if job.compare:
                run.remove()
        run.remove()
        report["timings"]["first_call_s"] = first_call
        report["timings"]["accelerated"] = reports.timing_summary(times["accelerated"], job.batch_size, recipe.steps)
        # what the first call cost beyond a steady one (compilation, autotuning, allocator warm-up); never
        # below zero: on a busy machine a steady call can take longer than the first
        steady = report["timings"]["accelerated"]["per_image_s"] * job.batch_size
        report["timings"]["first_call_extra_s"] = round(max(0.0, first_call - steady), 5)

        if meshes.launched_world_size() > 1:
            stage = "gather"
            report["ranks"] = _per_rank_timings(times["accelerated"], job.batch_size, recipe.steps)

        stage = "save"
        if writes:
            report["outputs"] = save_outputs(output, run_dir, "image")
        if job.compare:
            stage = "quality"
            figures = reports.quality(job.metrics, output, reference, prompts=job.prompt, latents=latents,
                                      reference_latents=reference_latents)
            report["baseline"] = reports.comparison(times["baseline"], times["accelerated"], job.batch_size,
                                                    recipe.steps, figures)
            if writes:
                report["outputs"] += save_outputs(reference, run_dir, "baseline")
    except KeyboardInterrupt:
        report["failed_at"], report["error"] = stage, "interrupted (Ctrl-C)"
        if writes:
            reports.write_json(run_dir / "report.json", report)
        raise Interrupted(f"interrupted during {stage} (report so far: {run_dir / 'report.json'})") from None
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
        if mesh is not None:
            mesh.close()
    if writes:
        reports.write_json(run_dir / "report.json", report)
    return report


def _per_rank_timings(seconds: list[float], images: int, steps: int) -> list[dict]:
    """Every rank's timings, gathered to every rank (rank 0 reports them)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, seconds)
    return [{"rank": rank, **reports.timing_summary(times, images, steps)} for rank, times in enumerate(gathered)]


def write_replay_recipe(recipe: Recipe, path: Path, header: Sequence[str] = ()) -> None:
    """The validated recipe as a recipe file that replays on its own (every value written out, no
    search path needed): `ACCEL_RECIPES=<run folder> python -m accel recipe=recipe`. `header`: lines
    of comment above it (what the recipe is and the evidence for it)."""
    lines = [f"# {line}" for line in header] or ["# The fully composed recipe of this run."]
    lines += ["# Replay it with:",
              f"#   ACCEL_RECIPES={path.parent} python -m accel recipe={path.stem}",
              "defaults:",
              "  - override /model: null  # the model's every field is below"]
    lines += [f"  - override /{stage}: {config.strategy}" for stage, config in recipe.stages().items()]
    lines += ["  - _self_", "", OmegaConf.to_yaml(recipe.to_dict())]
    path.write_text("\n".join(lines))


def main_task(recipe: Recipe, run_dir: Path) -> None:
    """`python -m accel`'s task: the job, then its table (rank 0; other ranks ran in a scratch folder)."""
    report = run_job(recipe, run_dir)
    if meshes.launched_rank() != 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    print(f"accel: run folder {run_dir}")
    print(reports.summary_table(report))

