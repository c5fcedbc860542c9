"""Typed schemas of a recipe, registered with Hydra's ConfigStore, and composition with validation.

A composed recipe has one node per config group (`model`, and one per strategy stage) plus the
job's fields at the top level. Hydra checks types while it composes; `validate` then converts every
node to its dataclass (types again, unknown and removed keys, ranges) before anything is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional, Sequence

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from accel import cli, registry, resources
from accel.errors import ConfigError, require
from accel.recipe_source import find_target
from accel.recipe_source import install as install_recipe_source
from accel.schema import to_dataclass

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    """Which pipeline to load: real weights by id or path, a tiny one fabricated offline, or one trained
    for this package and shipped in it."""

    architecture: str = MISSING  # a registered architecture adapter: flux, sd3, ...
    source: str = "pretrained"  # pretrained | tiny | packaged
    pretrained: Optional[str] = None  # hub id or local folder; for source=packaged, a pipeline shipped in accel/toy/
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
        require(self.source in ("pretrained", "tiny", "packaged"), "source", self.source,
                "pretrained, tiny or packaged")
        require(self.source != "pretrained" or bool(self.pretrained), "pretrained", self.pretrained,
                "a hub id or local folder when source=pretrained")
        if self.source == "packaged":
            from accel.models.loading import packaged_pipelines

            require(self.pretrained in packaged_pipelines(), "pretrained", self.pretrained,
                    f"with source=packaged, one of the pipelines shipped in the package: {packaged_pipelines()}")
        require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        for name in ("height", "width", "steps"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.num_frames is None or self.num_frames >= 1, "num_frames", self.num_frames, ">= 1 or null")


@dataclass
class JobConfig:
    """The generation and measurement fields at the top level of a recipe."""

    prompt: str = "a red fox in fresh snow, golden hour, detailed fur"
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None  # null: the model's default
    height: Optional[int] = None
    width: Optional[int] = None
    guidance_scale: Optional[float] = None
    num_frames: Optional[int] = None  # video models; null: the model's default
    seed: int = 0
    batch_size: int = 1
    warmup: int = 1  # untimed generations of each variant first (compilation, allocator warm-up)
    repeats: Optional[int] = None  # timed generations of each variant; null: 3 with compare, else 1
    compare: bool = False  # also time the unaccelerated baseline, interleaved, and report speedup and quality
    metrics: Optional[list[str]] = None  # quality figures under compare (accel.metrics); null: every one that applies
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        for name in ("steps", "height", "width", "num_frames"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, ">= 1 or null (the model's default)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(self.warmup >= 0, "warmup", self.warmup, ">= 0")
        require(self.repeats is None or self.repeats >= 1, "repeats", self.repeats,
                ">= 1 or null (3 with compare=true, else 1)")
        from accel.metrics import check_names

        check_names(self.metrics)
        device = self.device
        require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "device", device,
                "auto, cpu, cuda or cuda:N")


# The whole recipe: the job's fields, the model, and one node per stage of the registry, so adding a
# stage to the registry adds it here, to the primary config and to replay recipes at once.
AccelConfig = make_dataclass(
    "AccelConfig", [("model", ModelConfig, field(default=MISSING)),
                    *((stage, Any, field(default=MISSING)) for stage in registry.STAGES)],
    bases=(JobConfig,))


# A stage's option when a recipe names none. `parallel=mesh` at 1 × 1 × 1 applies nothing, and lets
# `parallel.ulysses=2` on the command line turn it on without naming the option.
DEFAULT_OPTIONS = {"parallel": "mesh"}


def _primary_config() -> dict:
    """The primary config every run starts from: the schema, a model, a default for every stage, then
    the optional recipe (which picks options and sets fields), then the command line."""
    return {
        "defaults": ["accel_schema", "_self_", {"model": "flux_tiny"},
                     *({stage: DEFAULT_OPTIONS.get(stage, "none")} for stage in registry.STAGES), {"recipe": None},
                     {"override hydra/job_logging": "stdout"},
                     {"override hydra/sweeper": "accel"}, {"override hydra/launcher": "accel"}],
        "hydra": {
            "run": {"dir": _now(cli.RUN_DIR)},
            "sweep": {"dir": _now(cli.SWEEP_DIR), "subdir": "${hydra.job.num}"},
            "job": {"chdir": False},
            # our own code, named here by accel, not by a recipe: a multirun's summary (accel/sweep_report.py)
            "callbacks": {"accel_sweep_report": {"_target_": "accel.sweep_report.SweepReport"}},
            "help": {"template": help_text()},
        },
    }


def _now(pattern: str) -> str:
    """A strftime pattern as Hydra's `now` interpolation."""
    return "/".join("${now:" + part + "}" if "%" in part else part for part in pattern.split("/"))


def help_text() -> str:
    """`python -m accel --help`: groups, options and examples."""
    from accel.list import overview

    return "\n".join([
        "accel: faster diffusion pipelines from declarative recipes.",
        "",
        "  python -m accel recipe=NAME [GROUP=OPTION ...] [FIELD=VALUE ...]",
        "",
        "Examples:",
        "  python -m accel recipe=flux_fbcache model=flux_toy prompt=\"a large red circle at the top left\" compare=true",
        "  python -m accel recipe=flux_fbcache model=flux_tiny cache.residual_diff_threshold=0.3 steps=20 seed=7",
        "  python -m accel -m recipe=flux_fbcache model=flux_toy compare=true cache.residual_diff_threshold=0.04,0.08,0.2",
        "      (a sweep ends with summary.md/.csv, a speed-vs-quality plot, an image grid and index.html)",
        "  python -m accel.tune recipe=flux_fbcache model=flux_toy target.min_psnr=35   # the fastest setting that meets it",
        "  python -m accel recipe=flux_fbcache model=flux_tiny --cfg job     # print the composed recipe",
        "",
        overview(),
        "",
        "Top-level fields: " + ", ".join(f.name for f in fields(JobConfig)),
        "Each run writes images, report.json and a replayable recipe.yaml to its own folder under outputs/.",
        "compare=true also times the uncached baseline and reports quality against it (metrics=[...]; null: all that apply).",
        "Hydra's own options: --hydra-help",
    ]).replace("$", "$$")


def _register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="accel_schema", node=AccelConfig)
    store.store(group="schema", name="model", node=ModelConfig)
    for strategy in registry.all_strategies():
        store.store(group=f"schema/{strategy.stage}", name=strategy.name, node=strategy.config_cls)
        # every strategy is an option of its stage's group (`cache=NAME`): its YAML in conf/<stage>/,
        # or else its dataclass defaults
        if not (resources.conf_dir() / strategy.stage / f"{strategy.name}.yaml").exists():
            store.store(group=strategy.stage, name=strategy.name, node=strategy.config_cls)
    import hydra_plugins.accel_sweep  # noqa: F401  the sweeper and launcher that keep a sweep going past a failed job

    store.store(name="accel", node=_primary_config())


def validate(cfg: DictConfig) -> DictConfig:
    """Check a composed recipe against its schemas (types, unknown or removed keys, ranges, strategy
    names, fields that do not fit the model's architecture); raise ConfigError naming the field."""
    target = find_target(cfg)
    if target is not None:
        raise ConfigError(f"{target} is set: recipes are shared data and cannot name code to import; "
                          "strategies are chosen by registered name (python -m accel.list)")
    values = OmegaConf.to_container(cfg, resolve=True)
    stages = {stage: values.pop(stage, None) for stage in registry.STAGES}
    model = to_dataclass(ModelConfig, values.pop("model", None) or {}, where="model.", complete=True)
    job = to_dataclass(JobConfig, values, complete=True, label="a recipe's top level (groups: model, "
                                                             f"{', '.join(registry.STAGES)})")
    for stage, node in stages.items():
        if node in (None, "???"):
            raise ConfigError(f"{stage} cannot be removed: every recipe has one node per stage ({stage}=none for nothing)")
        registry.build_config(stage, node, complete=True)
    _check_against_architecture(job, model)
    return cfg


def _check_against_architecture(job: JobConfig, model: ModelConfig) -> None:
    from accel.models.adapters import ADAPTERS

    adapter = ADAPTERS[model.architecture]
    if not adapter.video:
        video = sorted(a.architecture for a in ADAPTERS.values() if a.video)
        for name, value in (("num_frames", job.num_frames), ("model.num_frames", model.num_frames)):
            require(value is None, name, value, f"null: {model.architecture} makes images; frames apply to the "
                                                f"video architectures ({', '.join(video)})")


def strategy_configs(recipe) -> dict[str, Any]:
    """The validated config dataclass of every stage a recipe (DictConfig or dict) names."""
    known = {f.name for f in fields(AccelConfig)}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a stage of a recipe: the stages are {', '.join(registry.STAGES)} "
                          f"(for example {{'cache': {{'strategy': 'fbcache'}}}})")
    return {stage: registry.build_config(stage, recipe[stage]) for stage in registry.STAGES if stage in recipe}


def compose(recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a recipe exactly as `python -m accel recipe=NAME OVERRIDES...` would, and validate it."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} must be a list of 'key=value' strings, e.g. ['model=flux_tiny']")
    overrides = list(overrides)
    if recipe is not None:
        overrides.insert(0, f"recipe={recipe}")
    return validate(compose_raw(overrides, with_hydra=False))


def compose_raw(overrides: Sequence[str], config_dir: Optional[str] = None, config_name: str = "accel",
                with_hydra: bool = True) -> DictConfig:
    """Hydra's composition alone, its errors as one-line ConfigErrors. `config_dir`/`config_name`
    name another primary config (a run folder's `.hydra/`, for Hydra's own replay); `with_hydra`
    keeps the `hydra` node (run folder, sweep folder)."""
    setup()
    resources.user_recipe_dirs()  # a wrong ACCEL_RECIPES fails here, by name, not inside Hydra
    try:
        with initialize_config_dir(config_dir=config_dir or str(resources.conf_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(clean_hydra_message(err)) from None


def clean_hydra_message(err: Exception) -> str:
    """Hydra's message without the search-path dump and the `+key` hint (schemas are closed)."""
    if isinstance(err, yaml.YAMLError):
        return describe_yaml_error(err)
    message = str(err).strip()
    cause = err.__cause__
    if isinstance(cause, yaml.YAMLError):
        return describe_yaml_error(cause)
    if isinstance(cause, OmegaConfBaseException):
        return f"{message.splitlines()[0]}: {str(cause).splitlines()[0]}"
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message}\n{cause}"
    message = message.split("Config search path:")[0]
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("To append to your config")]
    return " ".join(line.strip() for line in lines)


def describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a YAML file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: YAML syntax error: {problem}"


def setup() -> None:
    """Register schemas and the recipe search path with Hydra; idempotent."""
    global _DONE
    if not _DONE:
        import accel.strategies  # noqa: F401  registers every strategy

        _register_schemas()
        install_recipe_source()
        _DONE = True


_DONE = False
