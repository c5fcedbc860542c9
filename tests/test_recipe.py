"""A recipe, validated once into a frozen, typed Recipe: one composition and one validation per run,
defaults in the dataclasses alone, a stage's strategy switchable on the command line for every
shipped recipe, free-form maps taking dotted keys, and nothing in it that names code."""
import dataclasses
import re
import sys

import pytest
from omegaconf import OmegaConf

import accel
from accel import registry, resources
from accel.errors import ConfigError
from accel.recipe import Recipe

RECIPES = sorted(p.stem for p in resources.recipes_dir().glob("*.yaml"))
CACHE_KINDS = [name for name in registry.names("cache")]


def test_compose_gives_a_frozen_typed_recipe_whose_sizes_fall_back_to_the_models():
    recipe = accel.compose("flux_fbcache", ["model=flux_tiny", "cache.residual_diff_threshold=0.1", "seed=7"])
    assert isinstance(recipe, Recipe) and type(recipe.cache).__name__ == "FBCacheConfig"
    assert recipe.cache.residual_diff_threshold == 0.1 and recipe.job.seed == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.cache.residual_diff_threshold = 0.5
    assert (recipe.height, recipe.width, recipe.steps) == (64, 64, 28)  # the recipe's steps: 28; sizes: the model's
    assert accel.compose(None, ["model=flux_tiny"]).steps == 28 and accel.compose(None, ["model=wan_tiny"]).steps == 20


@pytest.mark.parametrize("stage", registry.STAGES)
def test_a_yaml_option_restates_no_default_of_its_strategy(stage):
    """The dataclasses are the one source of defaults: an option sets its strategy and what it changes."""
    for path in (resources.conf_dir() / stage).glob("*.yaml"):
        option = OmegaConf.to_container(OmegaConf.load(path))
        option.pop("defaults", None)
        strategy = registry.get(stage, option.pop("strategy", path.stem if path.stem in registry.names(stage) else
                                                  "mesh"))
        defaults = {f.name: f.default for f in dataclasses.fields(strategy.config_cls)}
        restated = {k: v for k, v in option.items() if defaults.get(k, object()) == v}
        assert not restated, (path, restated)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_every_shipped_recipe_takes_every_cache_kind_from_the_command_line(recipe, kind):
    composed = accel.compose(recipe, [f"cache={kind}"])
    assert composed.cache.strategy == kind
    own = {f.name for f in dataclasses.fields(type(composed.cache))}
    shipped = OmegaConf.to_container(OmegaConf.load(resources.recipes_dir() / f"{recipe}.yaml")).get("cache", {})
    for field, value in shipped.items():  # the recipe's fields carry over where the kind has them
        if field in own:
            assert getattr(composed.cache, field) == value
        else:
            assert any(f"cache.{field}" in note for note in composed.notes), composed.notes


def test_a_field_of_another_kind_set_by_the_user_is_refused_naming_the_kinds_fields():
    with pytest.raises(ConfigError, match=r"^cache.rel_l1_threshold is not a field of cache=fbcache; its fields are: "
                                          r"strategy, start, .*residual_diff_threshold"):
        accel.compose("flux_fbcache", ["cache.rel_l1_threshold=0.3"])
    switched = accel.compose("sdxl_fbcache", ["cache=teacache", "cache.rel_l1_threshold=0.3"])
    assert switched.cache.rel_l1_threshold == 0.3 and "cache.residual_diff_threshold=0.2" in switched.notes[0]


def test_free_form_maps_take_dotted_keys():
    recipe = accel.compose("flux_compile", ["model=flux_tiny", "compile.options.max_autotune=true",
                                            "compile.options.epilogue_fusion=false", "model.tiny.num_layers=3"])
    assert recipe.compile.options == {"max_autotune": True, "epilogue_fusion": False}
    assert recipe.model.tiny == {"num_layers": 3}


def test_prompts_are_taken_as_written():
    prompt = "a red fox, at night {moonlit} [35mm] it's \"sharp\" \\ end\\"
    assert accel.compose(None, [f"prompt={prompt}"]).job.prompt == prompt


@pytest.mark.parametrize("override, where", [
    ("+compile.options._target_=os.system", "compile.options._target_ is set"),
    ("+model.tiny._target_=os.system", "model.tiny._target_ is set"),
    ("prompt=${oc.env:PATH}", "prompt calls the resolver 'oc.env'"),
    ("+model.tiny.stamp=${now:%H}", "model.tiny.stamp calls the resolver 'now'"),
])
def test_code_or_a_resolver_in_a_free_form_field_is_refused_naming_where(override, where):
    """A free-form map accepts any key and value: only the refusal of code can stop these."""
    with pytest.raises(ConfigError, match=rf"^{where}.*: a recipe is data shared between people, so it cannot name "
                                          "code to import or call, nor read the environment or files"):
        accel.compose("flux_fbcache", ["model=flux_tiny", override])


@pytest.mark.parametrize("override, message", [
    ("cache.warmup_steps=-1", "cache.warmup_steps=-1 is not allowed: >= 0"),
    ("cache.max_cached_steps=-2", "cache.max_cached_steps=-2 is not allowed: -1 (unlimited) or >= 0"),
    ("cache.forecast_order=5", "cache.forecast_order=5 is not allowed: 1 to 4"),
    ("seed=-1", "seed=-1 is not allowed: an integer from 0 to"),
])
def test_ranges_are_checked_naming_the_field(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        accel.compose("flux_fbcache", ["model=flux_tiny", override])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"^recipe is given twice \(recipe=flux_fbcache and recipe=flux_fast\)"):
        accel.compose("flux_fbcache", ["recipe=flux_fast"])


def test_replace_changes_a_stage_and_validates_it():
    recipe = accel.compose("flux_fbcache", ["model=flux_tiny"])
    assert recipe.replace(cache={"residual_diff_threshold": 0.3}).cache.residual_diff_threshold == 0.3
    assert recipe.replace(cache={"strategy": "teacache"}).cache.rel_l1_threshold == 0.4
    with pytest.raises(ConfigError, match="cache.residual_diff_threshold=-1"):
        recipe.replace(cache={"residual_diff_threshold": -1})
    with pytest.raises(ConfigError, match="compile=torch cannot run with cache=fbcache"):
        recipe.replace(compile={"strategy": "torch", "scope": "full"})


def test_one_run_composes_once_and_validates_once(tmp_path, monkeypatch):
    """From the command line to the cache's comparison: one Hydra composition, one Recipe, one
    FBCacheConfig; apply takes the Recipe as it is."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra

    from accel import cli, doctor
    from accel.job import main_task
    from accel.strategies.fbcache import FBCacheConfig

    counts = {"compositions": 0, "recipes": 0, "fbcache_configs": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration",
                        counting("compositions", ConfigLoaderImpl.load_configuration))
    monkeypatch.setattr(Recipe, "from_dict", classmethod(counting("recipes", Recipe.from_dict.__func__)))
    monkeypatch.setattr(FBCacheConfig, "__post_init__", counting("fbcache_configs", FBCacheConfig.__post_init__))
    monkeypatch.setattr(sys, "argv", ["accel", "recipe=flux_fbcache", "model=flux_tiny", "steps=2", "warmup=0",
                                      "compare=true", "repeats=2", "cache.residual_diff_threshold=0.1",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    try:
        cli.main(main_task, doctor.check)
    finally:
        GlobalHydra.instance().clear()
    assert counts == {"compositions": 1, "recipes": 1, "fbcache_configs": 1}
    assert (tmp_path / "run" / "report.json").exists()
