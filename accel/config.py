"""Composition of recipes with Hydra: the schemas it composes against, the primary config every run
starts from, and `compose`, which turns a recipe name and overrides into a validated `Recipe`.

Hydra composes one node per config group (`model`, and one per strategy stage) plus the job's fields at
the top level, checking types and keys as it goes; `Recipe.from_dict` then validates the result once.
A stage's node carries every field of every strategy of that stage, all null unless something set
them, so a recipe written for one strategy still composes when the command line picks another
(`recipe=sdxl_fbcache cache=teacache`): the fields they share carry over, the others are left out.
Defaults live in the dataclasses alone; a YAML option sets only what it changes.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import field, make_dataclass
from typing import Any, Optional, Sequence

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from accel import registry, resources
from accel.errors import ConfigError
from accel.catalog import overview
from accel.recipe import JobConfig, ModelConfig, Recipe, refuse_code
from accel.recipe_source import install as install_recipe_source
from accel.recipe_source import recipe_file

RUN_DIR = "outputs/%Y-%m-%d/%H-%M-%S-%f"  # strftime; to the microsecond, and claimed atomically (accel.cli)
SWEEP_DIR = "multirun/%Y-%m-%d/%H-%M-%S-%f"
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, yaml.YAMLError)
# values taken literally from the command line: prompts hold commas, brackets and quotes as they are
LITERAL_FIELDS = ("prompt", "negative_prompt")
_SWEEP_FUNCTIONS = re.compile(r"^\s*(choice|range|interval|glob|shuffle|sort|tag)\(")


# -- the schemas Hydra composes against ----------------------------------------------------------------

def _importable(cls: type) -> type:
    """A generated schema as an attribute of this module, so launchers that pickle Hydra's state to run
    jobs elsewhere (joblib, submitit) find it by name instead of rebuilding it by value."""
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals()[cls.__name__] = cls
    return cls


def _open_copy(cls: type, name: str) -> type:
    """A non-frozen dataclass with `cls`'s fields and defaults (Hydra merges overrides into it; the
    frozen original is built once, from the result)."""
    hints = typing.get_type_hints(cls)
    return _importable(make_dataclass(name, [(f.name, hints[f.name], _default(f)) for f in dataclasses.fields(cls)]))


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory)
    return field(default=MISSING if f.default is dataclasses.MISSING else f.default)


def stage_options(stage: str) -> type:
    """Every field of every strategy of `stage`, each optional and null until something sets it."""
    types: dict[str, Any] = {}
    for strategy in registry.strategies(stage):
        hints = typing.get_type_hints(strategy.config_cls)
        for f in dataclasses.fields(strategy.config_cls):
            if f.name == "strategy":
                continue
            typ = Optional[hints[f.name]]
            if types.setdefault(f.name, typ) != typ:
                raise TypeError(f"{stage} strategies declare {f.name} with two types: {types[f.name]} and {typ}")
    # a free-form map starts empty rather than null, so that dotted keys can be added to it
    return _importable(make_dataclass(f"{stage.title()}Options", [
        ("strategy", str, field(default="none")),
        *((name, typ, field(default_factory=dict) if _is_map(typ) else field(default=None))
          for name, typ in types.items())]))


def _is_map(typ) -> bool:
    return any(t is dict or typing.get_origin(t) is dict for t in (typ, *typing.get_args(typ)))


def accel_config() -> type:
    """The whole recipe as Hydra composes it: the job's fields, the model, one node per stage."""
    job = _open_copy(JobConfig, "JobOptions")
    return _importable(make_dataclass("AccelConfig", [
        *((f.name, f.type, _default(f)) for f in dataclasses.fields(job)),
        ("model", _open_copy(ModelConfig, "ModelOptions"), field(default=MISSING)),
        *((stage, stage_options(stage), field(default=MISSING)) for stage in registry.STAGES)]))


AccelConfig = accel_config()


# A stage's option when a recipe names none. `parallel=mesh` at 1 × 1 × 1 applies nothing, and lets
# `parallel.ulysses=2` on the command line turn it on without naming the option.
DEFAULT_OPTIONS = {"parallel": "mesh"}


def _primary_config() -> dict:
    """The primary config every run starts from: the schema, a model, a default for every stage, then
    the optional recipe (which picks options and sets fields), then the command line."""
    return {
        "defaults": ["accel_schema", "_self_", {"model": "flux_tiny"},
                     *({stage: DEFAULT_OPTIONS.get(stage, "none")} for stage in registry.STAGES), {"recipe": None},
                     {"override hydra/job_logging": "stdout"}, {"override hydra/sweeper": "accel"}],
        "hydra": {
            "run": {"dir": _now(RUN_DIR)},
            "sweep": {"dir": _now(SWEEP_DIR), "subdir": "${hydra.job.num}"},
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
        "Top-level fields: " + ", ".join(f.name for f in dataclasses.fields(JobConfig)),
        "prompt= and negative_prompt= are taken as written (commas and brackets included); in a sweep,",
        "  sweep prompts with choice(\"a red fox, at night\",\"a cat\").",
        "Each run writes images, report.json and a replayable recipe.yaml to its own folder under outputs/.",
        "compare=true also times the uncached baseline and reports quality against it (metrics=[...]; null: all that apply).",
        "Hydra's own options: --hydra-help",
    ]).replace("$", "$$")


def setup() -> None:
    """Register the schemas and the recipe search path with Hydra; idempotent."""
    global _DONE
    if _DONE:
        return
    store = ConfigStore.instance()
    store.store(name="accel_schema", node=AccelConfig)
    for stage in registry.STAGES:
        for strategy in registry.strategies(stage):
            # every strategy is an option of its stage's group (`cache=NAME`): its YAML in conf/<stage>/,
            # or else just its name, its fields at their defaults
            if not (resources.conf_dir() / stage / f"{strategy.name}.yaml").exists():
                store.store(group=stage, name=strategy.name, node={"strategy": strategy.name})
    store.store(name="accel", node=_primary_config())
    install_recipe_source()
    _DONE = True


_DONE = False


# -- overrides as a user means them ------------------------------------------------------------------

def prepare_overrides(overrides: Sequence[str], sweep: bool = False) -> list[str]:
    """The command line's overrides as Hydra should read them: prompts taken literally, dotted keys into
    free-form maps (`compile.options.max_autotune=true`) added where missing; a key given twice refused."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} must be a list of 'key=value' strings, e.g. ['model=flux_tiny']")
    seen: dict[str, str] = {}
    prepared = []
    for override in overrides:
        key, eq, value = override.partition("=")
        bare = key.lstrip("+~")
        if bare in seen and eq:
            raise ConfigError(f"{bare} is given twice ({seen[bare]} and {override}): give it once")
        seen[bare] = override
        if key.startswith("~") and bare not in ("recipe", "model", *registry.STAGES):
            raise ConfigError(f"{bare} cannot be removed: every field of a recipe has a value; set it instead "
                              f"({bare}=...)")
        if eq and key == bare and bare in ("model", *registry.STAGES) and value.strip() in ("null", ""):
            raise ConfigError(f"{override} is not allowed: {bare} needs an option (python -m accel.list shows them"
                              + ("" if bare == "model" else f"; {bare}=none applies nothing") + ")")
        if eq and key == bare and bare in LITERAL_FIELDS and not _quoted(value) and \
                not (sweep and _SWEEP_FUNCTIONS.match(value)):
            override = f"{key}={quote(value)}"
        elif eq and key == bare and _in_free_form_map(bare):
            override = f"++{override}"
        prepared.append(override)
    return prepared


def quote(value: str) -> str:
    """`value` as a single-quoted string of Hydra's override grammar (backslashes before a quote, or at
    the end, doubled; quotes escaped)."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def _quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def _in_free_form_map(key: str) -> bool:
    """Whether `key` is a key inside a dict-typed field (compile.options.X, model.tiny.X)."""
    return key.count(".") >= 2 and ".".join(key.split(".")[:2]) in free_form_maps()


@functools.lru_cache(maxsize=None)
def free_form_maps() -> frozenset[str]:
    """The dict-typed fields a user may add keys to, as `group.field` (compile.options, model.tiny)."""
    found = set()
    for prefix, cls in [("model", ModelConfig), *((s.stage, s.config_cls) for s in registry.strategies())]:
        for name, typ in typing.get_type_hints(cls).items():
            if _is_map(typ):
                found.add(f"{prefix}.{name}")
    return frozenset(found)


def user_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys the overrides set (what the user asked for by name)."""
    return [o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~")]


# -- composing ----------------------------------------------------------------------------------------

def compose(recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> Recipe:
    """The validated Recipe `python -m accel recipe=NAME OVERRIDES...` would run."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} must be a list of 'key=value' strings, e.g. ['model=flux_tiny']")
    overrides = prepare_overrides(([f"recipe={recipe}"] if recipe is not None else []) + list(overrides))
    cfg = compose_config(overrides)
    return recipe_of(cfg, overrides)


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """Hydra's composition alone, with its `hydra` node (the run's folder, the choices), its errors as
    one-line ConfigErrors."""
    setup()
    resources.user_recipe_dirs()  # a wrong ACCEL_RECIPES fails here, by name, not inside Hydra
    try:
        with initialize_config_dir(config_dir=str(resources.conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="accel", overrides=list(overrides), return_hydra_config=True)
    except COMPOSE_ERRORS as err:
        raise ConfigError(clean_hydra_message(err)) from None


def recipe_of(cfg: DictConfig, overrides: Sequence[str] = (), complete: bool = True) -> Recipe:
    """The Recipe of a composed config (its `hydra` node tells which recipe file it came from)."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    refuse_code(job)
    try:
        values = OmegaConf.to_container(job, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(clean_hydra_message(err)) from None
    chosen = OmegaConf.select(cfg, "hydra.runtime.choices.recipe", default=None) if "hydra" in cfg else None
    found, shadowed = recipe_file(chosen) if chosen else (None, [])
    recipe = Recipe.from_dict(values, user_keys=user_keys(overrides), complete=complete,
                              recipe_file=None if found is None else str(found))
    if shadowed:
        note = f"recipe={chosen}: using {found}, which takes precedence over {', '.join(map(str, shadowed))}"
        recipe = dataclasses.replace(recipe, notes=(note, *recipe.notes))
    return recipe


def clean_hydra_message(err: Exception) -> str:
    """Hydra's message without the search-path dump and the `+key` hint (schemas are closed), with the
    way to quote a value where Hydra's grammar tripped on it."""
    if isinstance(err, yaml.YAMLError):
        return describe_yaml_error(err)
    message = str(err).strip()
    cause = err.__cause__
    if isinstance(cause, yaml.YAMLError):
        return describe_yaml_error(cause)
    if isinstance(cause, OmegaConfBaseException):
        message = f"{message.splitlines()[0]}: {str(cause).splitlines()[0]}"
    elif cause is not None and str(cause) and str(cause) not in message:
        message = f"{message}\n{cause}"
    message = message.split("Config search path:")[0]
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("To append to your config")]
    message = " ".join(line.strip() for line in lines)
    if "Ambiguous value" in message or "mismatched input" in message or "no viable alternative" in message:
        message += (" (a value with commas, brackets, braces or quotes is written in quotes, e.g. "
                    "'negative_prompt=\"blurry, low quality\"'; to sweep values use -m)")
    return message


def describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a YAML file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}: YAML syntax error: {problem}"


def parse_overrides(overrides: Sequence[str]):
    """Hydra's parse of the overrides (for their keys and sweeps), its errors as ConfigErrors."""
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except COMPOSE_ERRORS as err:
        raise ConfigError(clean_hydra_message(err)) from None
