"""`python -m accel.doctor recipe=NAME [overrides]`: does a recipe fit its model and this device?

Answered before anything heavy loads, from the model's config files and the device alone: sizes the
model makes exactly, weights that are here, and whatever each strategy declares next to its code
(`register(..., check=...)`: Fn + Bn against the block count, TeaCache coefficients, fp8 against the
GPU, an attention backend that is installed, a compiler inductor can use, …). Every run asks the same
questions before it gets a folder.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from accel import registry
from accel.errors import AccelError, ConfigError
from accel.models.adapters import ADAPTERS, BlockAdapter
from accel.models.loading import as_model_config, component_configs, locate, resolve_device


@dataclass
class ModelFacts:
    """What is known of a recipe's model and device before any weights load."""

    model: Any  # ModelConfig
    adapter: BlockAdapter
    configs: Optional[dict]  # {"vae": {...}, "denoiser": {...}} from the local files; None: weights on the hub
    device: torch.device
    stages: dict[str, Any]  # stage -> its validated config, so a check can see the others

    @property
    def block_count(self) -> Optional[int]:
        return None if self.configs is None else self.adapter.block_count(self.configs["denoiser"])


def facts(cfg: DictConfig) -> tuple[ModelFacts, list[str]]:
    """What is known without loading weights, and the problem of missing weights if they are."""
    from accel.config import strategy_configs

    model = as_model_config(cfg.model)
    adapter = ADAPTERS[model.architecture]
    try:
        folder, problems = locate(model), []
    except AccelError as err:  # missing weights: said first, and the checks that need no files still run
        folder, problems = None, [str(err)]
    configs = component_configs(folder, adapter) if folder is not None else None
    return ModelFacts(model, adapter, configs, resolve_device(cfg.device), strategy_configs(cfg)), problems


def diagnose(cfg: DictConfig) -> list[str]:
    """Every problem of a validated recipe on its model and this device, one line each."""
    known, problems = facts(cfg)
    if known.configs is not None:
        rule = known.adapter.size_rule(known.configs)
        model = known.model
        frames = (cfg.num_frames or model.num_frames) if known.adapter.video else None
        for field, value, allowed in rule.problems(cfg.height or model.height, cfg.width or model.width, frames):
            where = field if cfg.get(field) is not None else f"model.{field}"
            problems.append(f"{where}={value} is not allowed: {allowed}")
    for stage, config in known.stages.items():
        check = registry.get(stage, config.strategy).check
        if check is not None:
            problems += [f"{stage}.{problem}" for problem in check(known, config)]
    return problems


def check(cfg: DictConfig) -> None:
    """Raise a ConfigError with the first problem `diagnose` finds."""
    problems = diagnose(cfg)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more: "
                                                                   "python -m accel.doctor lists them)")


def main() -> None:
    from accel.config import compose

    cfg = compose(None, sys.argv[1:])
    problems = diagnose(cfg)
    stages = ", ".join(f"{stage}={cfg[stage].strategy}" for stage in registry.STAGES)
    print(f"model: {cfg.model.architecture} ({cfg.model.source}); {stages}")
    for problem in problems:
        print(f"  problem: {problem}")
    if problems:
        sys.exit(2)
    print("  ok: the recipe fits this model and device")


if __name__ == "__main__":
    from accel import cli

    cli.plain(main)
