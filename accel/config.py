"""Typed schemas of a recipe, registered with Hydra's ConfigStore, and composition with validation.

A composed recipe has one node per config group (`model`, and one per strategy stage) plus the
generation fields at the top level. Types and unknown keys fail while Hydra composes; ranges fail
right after, in `validate`, before anything is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from accel import registry, resources
from accel.errors import ConfigError, require
from accel.recipe_source import find_target
from accel.recipe_source import install as install_recipe_source

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    """Which pipeline to load: real weights by id or path, or a tiny one fabricated offline."""

    architecture: str = MISSING  # a registered architecture adapter: flux, sd3, ...
    source: str = "pretrained"  # pretrained | tiny
    pretrained: Optional[str] = None  # hub id or local folder, for source=pretrained
    revision: Optional[str] = None
    variant: Optional[str] = None
    tiny: dict[str, Any] = field(default_factory=dict)  # denoiser config overrides, for source=tiny
    tiny_seed: int = 0
    dtype: str = "bfloat16"
    # generation defaults of this model, used where the recipe leaves them null
    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance_scale: Optional[float] = 3.5
    num_frames: Optional[int] = None  # video models

    def __post_init__(self):
        from accel.models.adapters import ADAPTERS

        require(self.architecture in ADAPTERS, "architecture", self.architecture, f"one of {sorted(ADAPTERS)}")
        require(self.source in ("pretrained", "tiny"), "source", self.source, "pretrained or tiny")
        require(self.source != "pretrained" or bool(self.pretrained), "pretrained", self.pretrained,
                "a hub id or local folder when source=pretrained")
        require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        for name in ("height", "width", "steps"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.num_frames is None or self.num_frames >= 1, "num_frames", self.num_frames, ">= 1 or null")


@dataclass
class AccelConfig:
    """The top level of a composed recipe."""

    model: ModelConfig = MISSING
    quant: Any = field(default_factory=lambda: {"strategy": "none"})
    attention: Any = field(default_factory=lambda: {"strategy": "none"})
    parallel: Any = MISSING
    cache: Any = MISSING
    compile: Any = MISSING
    prompt: str = "a red fox in fresh snow, golden hour, detailed fur"
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None  # null: the model's default
    height: Optional[int] = None
    width: Optional[int] = None
    guidance_scale: Optional[float] = None
    num_frames: Optional[int] = None  # video models; null: the model's default
    seed: int = 0
    batch_size: int = 1
    warmup: int = 1  # untimed generations before the timed ones (compilation, allocator warm-up)
    repeats: int = 1  # timed generations
    compare: bool = False  # also run the unaccelerated baseline and report speedup and quality
    device: str = "auto"  # auto | cpu | cuda | cuda:N


def _register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="accel_schema", node=AccelConfig)
    store.store(group="schema", name="model", node=ModelConfig)
    for strategy in registry.all_strategies():
        store.store(group=f"schema/{strategy.stage}", name=strategy.name, node=strategy.config_cls)


def _validate_top_level(cfg: DictConfig) -> None:
    for name in ("steps", "height", "width", "num_frames"):
        value = cfg.get(name)
        require(value is None or value >= 1, name, value, ">= 1 or null (the model's default)")
    require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, ">= 1")
    require(cfg.warmup >= 0, "warmup", cfg.warmup, ">= 0")
    require(cfg.repeats >= 1, "repeats", cfg.repeats, ">= 1")
    device = cfg.device
    require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "device", device,
            "auto, cpu, cuda or cuda:N")


def validate(cfg: DictConfig) -> DictConfig:
    """Check ranges and strategy names of a composed recipe; raise ConfigError naming the field."""
    target = find_target(cfg)
    if target is not None:
        raise ConfigError(f"{target} is set: recipes are shared data and cannot name code to import; "
                          "strategies are chosen by registered name (python -m accel.list)")
    try:
        OmegaConf.to_object(cfg.model)
    except ConfigError as err:
        raise ConfigError(f"model.{err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"model: {registry.describe_omegaconf_error(err)}") from None
    for stage in registry.STAGES:
        registry.build_config(stage, cfg[stage])
    _validate_top_level(cfg)
    return cfg


def strategy_configs(recipe) -> dict[str, Any]:
    """The validated config dataclass of every stage a recipe (DictConfig or dict) names."""
    return {stage: registry.build_config(stage, recipe[stage]) for stage in registry.STAGES if stage in recipe}


def compose(recipe: Optional[str] = None, overrides: list[str] = ()) -> DictConfig:
    """Compose a recipe exactly as `python -m accel recipe=NAME OVERRIDES...` would, and validate it."""
    setup()
    overrides = list(overrides)
    if recipe is not None:
        overrides.insert(0, f"recipe={recipe}")
    try:
        with initialize_config_dir(config_dir=str(resources.conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(clean_hydra_message(err)) from None
    return validate(cfg)


def clean_hydra_message(err: Exception) -> str:
    """Hydra's message without the search-path dump and the `+key` hint (schemas are closed)."""
    message = str(err).strip()
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message}\n{cause}"
    message = message.split("Config search path:")[0]
    lines = [line for line in message.splitlines() if not line.startswith("To append to your config")]
    return "\n".join(lines).strip()


def setup() -> None:
    """Register schemas and the recipe search path with Hydra; idempotent."""
    global _DONE
    if not _DONE:
        import accel.strategies  # noqa: F401  registers every strategy

        _register_schemas()
        install_recipe_source()
        _DONE = True


_DONE = False
