"""`python -m accel.doctor recipe=NAME [overrides]`: does a recipe fit its model and this device?

Answered before anything heavy loads, from the model's config files and the device alone: weights
that are here (or a hub that answers), sizes the model makes exactly (from the published sizes when
the files are not here), whether the output fits the device's memory, the scheduler's step count, and
whatever each strategy declares next to its code (`register(..., check=...)`: Fn + Bn against the
block count, TeaCache coefficients, fp8 against the GPU, an attention backend that is installed, a
compiler inductor can use, a cache that can hit at all, …). Every run asks the same questions before
it gets a folder.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from accel import registry
from accel.config import compose
from accel.errors import AccelError, ConfigError, one_line_errors
from accel.families import ADAPTERS
from accel.models.adapters import BlockAdapter
from accel.models.loading import component_configs, locate, resolve_device
from accel.recipe import Recipe

USAGE = """usage: python -m accel.doctor [recipe=NAME] [OVERRIDES...]

Says, before any weights load, whether a recipe fits its model and this device, and lists every
problem it finds (exit code 2 if any). Takes the same recipe and overrides as `python -m accel`, e.g.
  python -m accel.doctor recipe=flux_fast quant.kind=float8_dynamic
  python -m accel.doctor recipe=sdxl_fbcache model=sdxl_tiny parallel=cfg2"""


@dataclass
class ModelFacts:
    """What is known of a recipe's model and device before any weights load."""

    recipe: Recipe
    adapter: BlockAdapter
    configs: Optional[dict]  # {"vae": {...}, "denoiser": {...}} from the local files; None: not here
    device: torch.device
    folder: Optional[Path] = None

    @property
    def model(self):
        return self.recipe.model

    @property
    def block_count(self) -> Optional[int]:
        return None if self.configs is None else self.adapter.block_count(self.configs["denoiser"])


def facts(recipe: Recipe) -> tuple[ModelFacts, list[str]]:
    """What is known without loading weights, and the problem of missing weights if they are."""
    adapter = ADAPTERS[recipe.model.architecture]
    try:
        folder, problems = locate(recipe.model), []
    except AccelError as err:  # missing weights: said first, and the checks that need no files still run
        folder, problems = None, [str(err)]
    configs = component_configs(folder, adapter) if folder is not None else None
    return ModelFacts(recipe, adapter, configs, resolve_device(recipe.job.device), folder), problems


def size_problems(known: ModelFacts) -> list[str]:
    recipe, adapter = known.recipe, known.adapter
    rule = adapter.size_rule(known.configs) if known.configs is not None else adapter.published_size
    frames = recipe.num_frames if adapter.video else None
    problems = []
    for name, value, allowed in rule.problems(recipe.height, recipe.width, frames):
        where = name if getattr(recipe.job, name) is not None else f"model.{name}"
        problems.append(f"{where}={value} is not allowed: {allowed}")
    return problems


def memory_problems(known: ModelFacts) -> list[str]:
    """Sizes whose activations cannot fit the device: a lower bound, from the VAE's widest full-resolution
    layer and the denoiser's token states, against the device's memory."""
    if known.configs is None:
        return []
    recipe = known.recipe
    pixels = recipe.height * recipe.width * (recipe.num_frames or 1) * recipe.job.batch_size
    bytes_per = torch.finfo(getattr(torch, recipe.model.dtype)).bits // 8
    channels = known.configs["vae"].get("block_out_channels", [128])[0]
    vae = 2 * channels * pixels * bytes_per  # a decoder layer's input and output at full resolution
    output = 3 * pixels * 4  # the decoded output, float32
    needed = max(vae, output)
    available = device_memory(known.device)
    if available is None or needed <= available:
        return []
    return [f"height={recipe.height}, width={recipe.width}"
            + (f", num_frames={recipe.num_frames}" if recipe.num_frames else "")
            + f" is not allowed here: decoding it needs at least {needed / 2**30:,.1f} GiB (the VAE's {channels} channels "
              f"at full resolution) and {known.device} has {available / 2**30:,.1f} GiB; choose a smaller size"]


def device_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def step_problems(known: ModelFacts) -> list[str]:
    """More steps than the scheduler has timesteps: refused by most schedulers, pointless for the rest."""
    limit = 1000
    if known.folder is not None and (known.folder / "scheduler" / "scheduler_config.json").exists():
        limit = json.loads((known.folder / "scheduler" / "scheduler_config.json").read_text()).get(
            "num_train_timesteps", limit)
    steps = known.recipe.steps
    if steps <= limit:
        return []
    where = "steps" if known.recipe.job.steps is not None else "model.steps"
    return [f"{where}={steps} is not allowed: at most {limit}, the timesteps this model's scheduler was trained with"]


def diagnose(recipe: Recipe) -> list[str]:
    """Every problem of a validated recipe on its model and this device, one line each."""
    known, problems = facts(recipe)
    problems += size_problems(known) + memory_problems(known) + step_problems(known)
    for stage, config in recipe.stages().items():
        check = registry.get(stage, config.strategy).check
        if check is not None:
            problems += [f"{stage}.{problem}" for problem in check(known, config)]
    return problems


def check(recipe: Recipe) -> None:
    """Raise a ConfigError with the first problem `diagnose` finds."""
    problems = diagnose(recipe)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more: "
                                                                   "python -m accel.doctor lists them)")


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(USAGE)
        return
    recipe = compose(None, sys.argv[1:])
    problems = diagnose(recipe)
    stages = ", ".join(f"{stage}={config.strategy}" for stage, config in recipe.stages().items())
    print(f"model: {recipe.model.architecture} ({recipe.model.source}); {stages}")
    for problem in problems:
        print(f"  problem: {problem}")
    if problems:
        sys.exit(2)
    print("  ok: the recipe fits this model and device")


if __name__ == "__main__":
    one_line_errors(main)
