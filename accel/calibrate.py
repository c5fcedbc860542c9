"""`python -m accel.calibrate recipe=NAME [overrides]`: fit TeaCache coefficients for any model.

Runs full, uncached generations over a few prompts. At every denoiser call after the first of a
branch it records x = the relative L1 change of block 0's modulated input (what TeaCache probes)
and y = the relative L1 change of the whole block stack's residual (what a hit reuses), then fits
y ≈ poly(x) of `order` with numpy.polyfit, as TeaCache's published coefficients were fitted.
Writes `teacache_calibrated.yaml` (a `cache` group option) into the run folder and prints how to use it.

The prompts should be ones the model is used with: `prompts=auto` (the default) takes the prompt set of
a packaged model that has one (model=flux_toy: its toy shapes task) and otherwise generic photo prompts;
`prompts=photo` or `prompts=toy` picks a set by name. `prompts=` is read by this command alone.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig

from accel import cli, doctor, intercept
from accel.api import load_pipeline
from accel.context import relative_l1
from accel.errors import AccelError, ConfigError, one_line_errors
from accel.job import generation_kwargs
from accel.families import ADAPTERS, for_pipeline
from accel.prompts import PHOTO, prompt_set
from accel.recipe import Recipe
from accel.strategies.block_cache import TimestepReader
from accel.strategies.teacache import ORDER, ModulatedInputDecider


class DiffRecorder:
    """Hooks on the first and last block recording (input change, residual change) per branch and step."""

    def __init__(self, pipe):
        adapter = for_pipeline(pipe)
        if adapter.modulated_input is None:
            raise AccelError(f"{adapter.architecture} has no modulated-input probe to calibrate TeaCache on")
        self.adapter = adapter
        blocks = adapter.blocks(adapter.denoiser(pipe))
        self.first, self.last = blocks[0], blocks[-1]
        self.pairs: list[tuple[float, float]] = []
        self.read_timestep = TimestepReader(adapter.denoiser(pipe), getattr(pipe, "scheduler", None))
        self.new_generation()
        self._undo = contextlib.ExitStack()
        self._undo.callback(intercept.around(adapter.denoiser(pipe), "forward", "cache", self._denoiser))
        self._undo.callback(intercept.around(self.first.module, "forward", "cache", self._first))
        self._undo.callback(intercept.around(self.last.module, "forward", "cache", self._last))

    def new_generation(self) -> None:
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.timestep, self.branch = None, 0

    def _denoiser(self, inner, *args, **kwargs):
        value = self.read_timestep(args, kwargs)
        self.branch = self.branch + 1 if value == self.timestep else 0
        self.timestep = value
        return inner(*args, **kwargs)

    def _first(self, inner, *args, **kwargs):
        self.modulated = self.adapter.modulated_input(self.first.module, self.first, args, kwargs)
        self.span_input = self.first.inputs(args, kwargs)[0]
        return inner(*args, **kwargs)

    def _last(self, inner, *args, **kwargs):
        output = inner(*args, **kwargs)
        residual = self.last.io.outputs(output)[0] - self.span_input
        branch = self.branch
        if branch in self.previous:
            before_input, before_residual = self.previous[branch]
            self.pairs.append((relative_l1(self.modulated, before_input), relative_l1(residual, before_residual)))
        self.previous[branch] = (self.modulated, residual)
        return output

    def remove(self) -> None:
        self._undo.close()


def min_steps(order: int) -> int:
    """Steps per generation a fit of `order` needs: every step after the first gives one pair, and a
    polynomial of `order` needs order + 1 of them."""
    return order + 2


def fit_coefficients(pairs: np.ndarray, order: int) -> list[float]:
    """y ≈ poly(x) through (x, y) pairs by least squares; coefficients highest order first, as numpy.polyfit."""
    return [float(c) for c in np.polyfit(pairs[:, 0], pairs[:, 1], order)]


def require_steps(steps: int, order: int) -> None:
    if steps < min_steps(order):
        raise ConfigError(f"steps={steps} is not allowed: calibrating an order-{order} polynomial needs at least "
                          f"{min_steps(order)} steps")


def calibrate(pipe, call_kwargs: dict, prompts=PHOTO, order: int = ORDER, seed: int = 0) -> tuple[list[float], np.ndarray]:
    if call_kwargs.get("num_inference_steps") is not None:
        require_steps(call_kwargs["num_inference_steps"], order)
    recorder = DiffRecorder(pipe)
    try:
        for i, prompt in enumerate(prompts):
            recorder.new_generation()
            pipe(**{**call_kwargs, "prompt": prompt}, generator=torch.Generator("cpu").manual_seed(seed + i))
    finally:
        recorder.remove()
    pairs = np.asarray(recorder.pairs)
    return fit_coefficients(pairs, order), pairs


_prompts_choice = "auto"  # the `prompts=` argument, taken off the command line before Hydra sees it


def _take_prompts_argument(argv: list[str]) -> str:
    """Remove `prompts=NAME` from argv and return NAME (auto when absent); a wrong name is a ConfigError."""
    found = [a for a in argv[1:] if a.startswith("prompts=")]
    if len(found) > 1:
        raise ConfigError(f"prompts= is given {len(found)} times ({', '.join(found)}): give it once")
    if not found:
        return "auto"
    argv.remove(found[0])
    name = found[0].split("=", 1)[1]
    prompt_set(name, {})  # validates the name
    return name


def _preflight(recipe: Recipe) -> None:
    adapter = ADAPTERS[recipe.model.architecture]
    if adapter.modulated_input is None:
        raise ConfigError(f"model.architecture={adapter.architecture!r}: TeaCache does not apply to it (no "
                          f"modulated-input probe), so there is nothing to calibrate; the architectures it applies "
                          f"to: {', '.join(a for a, x in ADAPTERS.items() if x.modulated_input is not None)}")
    doctor.check(recipe)
    require_steps(recipe.steps, ORDER)


def _job(recipe: Recipe, run_dir: Path) -> None:
    pipe = load_pipeline(recipe.model, recipe.job.device)
    kwargs = generation_kwargs(recipe, pipe)
    kwargs.pop("prompt")
    set_name, prompts = prompt_set(_prompts_choice, recipe.model)
    print(f"accel: calibrating on {len(prompts)} {set_name} prompts, e.g. {prompts[0]!r}")
    coefficients, pairs = calibrate(pipe, kwargs, prompts=prompts, order=ORDER, seed=recipe.job.seed)
    option = run_dir / "conf" / "cache" / "teacache_calibrated.yaml"
    option.parent.mkdir(parents=True, exist_ok=True)
    fit = np.poly1d(coefficients)(pairs[:, 0])
    residual = float(np.sqrt(np.mean((fit - pairs[:, 1]) ** 2)))
    # in the fitted polynomial's units, the published 0.4 means nothing: start where about half the steps cache
    threshold = ModulatedInputDecider(None, 0.0, coefficients).caches_about_half(list(pairs[:, 0]))
    choices = HydraConfig.get().runtime.choices
    architecture = recipe.model.architecture
    option.write_text(
        f"# TeaCache coefficients fitted by accel.calibrate on {architecture} (model={choices['model']}, "
        f"{kwargs['num_inference_steps']} steps, {len(prompts)} {set_name} prompts, {len(pairs)} pairs, "
        f"fit RMS {residual:.4g}).\n"
        "strategy: teacache\n"
        f"rel_l1_threshold: {threshold:.4g}  # caches about half the steps of the calibration runs; lower for "
        "quality, higher for speed\n"
        f"coefficients: [{', '.join(f'{c:.9g}' for c in coefficients)}]\n"
        f"fitted_on: {architecture}\n"
    )
    np.savetxt(run_dir / "calibration_pairs.csv", pairs, delimiter=",", header="input_rel_l1,residual_rel_l1")
    print(f"accel: fitted {len(coefficients)} coefficients on {len(pairs)} pairs (fit RMS {residual:.4g})")
    print(f"  {option}")
    print(f"use it: {_use_command(option.parent.parent.resolve(), choices['model'], kwargs['num_inference_steps'])}")


def _use_command(conf: Path, model: str, steps: int) -> str:
    """The command that runs the same model with the calibrated cache option, working as printed:
    only the overrides that apply to any recipe are kept (a recipe that sets cache fields would pin
    another cache schema)."""
    dropped = ("recipe=", "cache=", "cache.", "model=", "steps=", "hydra.")
    kept = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(dropped)]
    words = ["python", "-m", "accel", f"model={model}", *kept, f"steps={steps}",
             f"hydra.searchpath=[file://{conf}]", "cache=teacache_calibrated"]
    return " ".join(shlex.quote(w) for w in words)


def main() -> None:
    def take() -> None:
        global _prompts_choice
        _prompts_choice = _take_prompts_argument(sys.argv)

    one_line_errors(take)
    cli.main(_job, _preflight, task_name="calibrate")


if __name__ == "__main__":
    main()
