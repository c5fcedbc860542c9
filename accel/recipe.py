"""A recipe, validated once into typed, frozen dataclasses: the model, the job's fields, and one
config per stage of the registry. The CLI, the doctor, `apply`, the job, `tune` and `calibrate` all
take a `Recipe`; the dataclasses here and each strategy's config are the one source of defaults.

A recipe is data shared between people: nothing in it is imported or called. A `_target_` key or an
OmegaConf resolver (`${oc.env:...}`, `${now:...}`, ...) anywhere in it is refused, naming where;
plain interpolations of its own fields (`${height}`) are data and stay allowed.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

import accel.strategies  # noqa: F401  every strategy registered: a recipe names them
from accel import registry
from accel.errors import ConfigError, require
from accel.metrics import check_names
from accel.families import ADAPTERS
from accel.models.loading import packaged_pipelines
from accel.schema import to_dataclass

DTYPES = ("float32", "float16", "bfloat16")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


@dataclass(frozen=True)
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
        require(self.architecture in ADAPTERS, "model.architecture", self.architecture, f"one of {sorted(ADAPTERS)}")
        require(self.source in ("pretrained", "tiny", "packaged"), "model.source", self.source,
                "pretrained, tiny or packaged")
        require(self.source != "pretrained" or bool(self.pretrained), "model.pretrained", self.pretrained,
                "a hub id or local folder when source=pretrained")
        if self.source == "packaged":
            require(self.pretrained in packaged_pipelines(), "model.pretrained", self.pretrained,
                    f"with source=packaged, one of the pipelines shipped in the package: {packaged_pipelines()}")
        require(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {DTYPES}")
        for name in ("height", "width", "steps"):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), ">= 1")
        require(self.num_frames is None or self.num_frames >= 1, "model.num_frames", self.num_frames, ">= 1 or null")
        require(self.guidance_scale is None or self.guidance_scale >= 0, "model.guidance_scale", self.guidance_scale,
                ">= 0 or null")


@dataclass(frozen=True)
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
        require(self.guidance_scale is None or self.guidance_scale >= 0, "guidance_scale", self.guidance_scale,
                ">= 0 (1 or less turns classifier-free guidance off), or null (the model's default)")
        require(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"an integer from 0 to {MAX_SEED}")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(self.warmup >= 0, "warmup", self.warmup, ">= 0")
        require(self.repeats is None or self.repeats >= 1, "repeats", self.repeats,
                ">= 1 or null (3 with compare=true, else 1)")
        check_names(self.metrics)
        check_device(self.device)


def check_device(device: str) -> None:
    require(isinstance(device, str) and (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)),
            "device", device, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `to_dict()` is its data (what `recipe.yaml` and `report.json` hold);
    `recipe_file` and `notes` say where it came from and what composing it decided."""

    model: ModelConfig
    job: JobConfig = field(default_factory=JobConfig)
    quant: Any = field(default_factory=registry.NoStrategy)
    attention: Any = field(default_factory=registry.NoStrategy)
    parallel: Any = field(default_factory=registry.NoStrategy)
    cache: Any = field(default_factory=registry.NoStrategy)
    compile: Any = field(default_factory=registry.NoStrategy)
    recipe_file: Optional[str] = field(default=None, compare=False)  # the recipe file it was composed from
    notes: tuple[str, ...] = field(default=(), compare=False)  # what composition decided that a user should know

    # -- the job's sizes, the model's defaults where the recipe leaves them null ---------------------
    @property
    def steps(self) -> int:
        return self.job.steps or self.model.steps

    @property
    def height(self) -> int:
        return self.job.height or self.model.height

    @property
    def width(self) -> int:
        return self.job.width or self.model.width

    @property
    def guidance_scale(self) -> Optional[float]:
        return self.job.guidance_scale if self.job.guidance_scale is not None else self.model.guidance_scale

    @property
    def num_frames(self) -> Optional[int]:
        return self.job.num_frames or self.model.num_frames

    def stages(self) -> dict[str, Any]:
        """Every stage's config, in the order `apply` runs them."""
        return {stage: getattr(self, stage) for stage in registry.STAGES}

    def replace(self, **changes) -> "Recipe":
        """This recipe with some parts changed, validated: `model=`, `job=` or a stage (`cache=`), each
        a config object, or a dict of fields to change in it (a stage's dict naming another strategy
        starts from that strategy's defaults): `recipe.replace(cache={"residual_diff_threshold": 0.1})`."""
        for name, change in list(changes.items()):
            if not isinstance(change, dict):
                continue
            current = getattr(self, name)
            if name in registry.STAGES:
                if change.get("strategy", current.strategy) == current.strategy:
                    change = {**dataclasses.asdict(current), **change}
                changes[name] = registry.build_config(name, change)[0]
            else:
                cls = {"model": ModelConfig, "job": JobConfig}[name]
                changes[name] = to_dataclass(cls, {**dataclasses.asdict(current), **change},
                                             where="model." if name == "model" else "")
        changed = dataclasses.replace(self, **changes)
        check_recipe(changed)
        return changed

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.job), "model": dataclasses.asdict(self.model),
                **{stage: dataclasses.asdict(config) for stage, config in self.stages().items()}}

    @classmethod
    def from_dict(cls, values: dict, user_keys: Optional[Iterable[str]] = None, complete: bool = False,
                  recipe_file: Optional[str] = None) -> "Recipe":
        """Validate a recipe's data (a composed config, or a dict) into a Recipe: types, unknown and
        removed keys, ranges, strategy names, stages that cannot sit together, fields that do not fit
        the architecture. `user_keys`: the dotted keys the user set (None: every key is the user's);
        a field of another strategy than the one chosen is dropped, with a note, unless the user set
        it. `complete`: a composed recipe, which carries every field, so a removed one is refused."""
        values = dict(values)
        stages = {stage: values.pop(stage, None) for stage in registry.STAGES}
        model_values = values.pop("model", None)
        if model_values is None:
            raise ConfigError("model cannot be null or removed: name a model option (model=flux_tiny, model=flux, ...: "
                              "python -m accel.list shows them)")
        model = to_dataclass(ModelConfig, model_values, where="model.", complete=complete)
        job = to_dataclass(JobConfig, values, complete=complete,
                           label=f"a recipe's top level (groups: model, {', '.join(registry.STAGES)})")
        configs, notes = {}, []
        for stage, node in stages.items():
            if node is None and complete:
                raise ConfigError(f"{stage} cannot be removed: every recipe has one node per stage ({stage}=none for nothing)")
            configs[stage], dropped = registry.build_config(stage, node or {"strategy": "none"}, user_keys)
            notes += dropped
        recipe = cls(model, job, **configs, recipe_file=recipe_file, notes=tuple(notes))
        check_recipe(recipe)
        return recipe


def check_recipe(recipe: Recipe) -> None:
    """What only the whole recipe can say: stages that cannot sit together, fields the architecture has not."""
    problems = registry.conflicts(recipe.stages())
    if problems:
        raise ConfigError(problems[0])
    adapter = ADAPTERS[recipe.model.architecture]
    if not adapter.video:
        video = sorted(a.architecture for a in ADAPTERS.values() if a.video)
        for name, value in (("num_frames", recipe.job.num_frames), ("model.num_frames", recipe.model.num_frames)):
            require(value is None, name, value, f"null: {recipe.model.architecture} makes images; frames apply to the "
                                                f"video architectures ({', '.join(video)})")


# -- what a recipe may not hold ------------------------------------------------------------------------

_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")


def find_code(node, path: str = "") -> Optional[str]:
    """Where a config (unresolved) names code: a `_target_` key or a resolver call; None if nowhere.
    Says what it found, e.g. "hydra.callbacks.boom._target_" or "prompt calls the resolver 'oc.env'"."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                return f"{where} is set"
            found = find_code(node._get_node(key), where)
            if found:
                return found
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            found = find_code(node._get_node(i), f"{path}[{i}]")
            if found:
                return found
    elif node is not None and hasattr(node, "_value"):
        value = node._value()
        if isinstance(value, str):
            resolver = _RESOLVER.search(value)
            if resolver:
                return f"{path or 'a value'} calls the resolver '{resolver.group(1)}' ({value!r})"
    elif isinstance(node, dict):
        return find_code(OmegaConf.create(node), path)
    return None


def refuse_code(cfg) -> None:
    """A ConfigError if `cfg` names code to import or a resolver to call."""
    found = find_code(cfg)
    if found is not None:
        raise ConfigError(f"{found}: a recipe is data shared between people, so it cannot name code to import or "
                          "call, nor read the environment or files; write the value itself (strategies are chosen "
                          "by their registered names: python -m accel.list)")
