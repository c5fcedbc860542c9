"""Composition of recipes: group options, search path, typed schemas, and the errors bad input gets."""
import textwrap

import pytest
from omegaconf import OmegaConf

import accel
from accel import registry
from accel.errors import ConfigError
from accel.recipe import Recipe


def test_recipe_picks_group_options_and_command_line_overrides_fields():
    cfg = accel.compose("flux_fbcache", ["model=flux_tiny", "cache.residual_diff_threshold=0.1", "seed=7"])
    assert cfg.model.architecture == "flux" and cfg.model.source == "tiny"
    assert cfg.cache.strategy == "fbcache"
    assert cfg.cache.residual_diff_threshold == 0.1
    assert cfg.job.seed == 7
    assert cfg.compile.strategy == "none" and cfg.parallel.strategy == "mesh" and cfg.parallel.ulysses == 1


def test_recipe_names_the_real_model_by_default():
    cfg = accel.compose("flux_fbcache")
    assert cfg.model.pretrained == "black-forest-labs/FLUX.1-dev"


def test_a_recipe_can_switch_cache_kind_from_the_command_line():
    cfg = accel.compose("flux_fbcache", ["cache=none"])
    assert cfg.cache.strategy == "none"


@pytest.mark.parametrize(
    "recipe, overrides, expected",
    [
        ("no_such_recipe", [], ["recipe/no_such_recipe", "flux_fbcache"]),
        ("flux_fbcache", ["cache=no_such_cache"], ["cache/no_such_cache", "fbcache", "none"]),
        ("flux_fbcache", ["model=no_such_model"], ["model/no_such_model", "flux_tiny"]),
        ("flux_fbcache", ["cache.no_such_key=1"], ["no_such_key"]),
        ("flux_fbcache", ["cache.residual_diff_threshold=fast"], ["fast", "cache.residual_diff_threshold"]),
        ("flux_fbcache", ["cache.residual_diff_threshold=-0.1"], ["cache.residual_diff_threshold=-0.1", ">= 0"]),
        ("flux_fbcache", ["cache.start=0.6", "cache.end=0.4"], ["cache.start=0.6", "below end=0.4"]),
        ("flux_fbcache", ["cache.max_consecutive_hits=-2"], ["cache.max_consecutive_hits=-2", "-1"]),
        ("flux_fbcache", ["steps=0"], ["steps=0", ">= 1"]),
        ("flux_fbcache", ["model.dtype=float8"], ["model.dtype='float8'", "bfloat16"]),
        ("flux_fbcache", ["no_such_top_level=1"], ["no_such_top_level"]),
        # Hydra's `+key` opens the schema; accel's schemas stay closed
        ("flux_fbcache", ["+cache.residual_dif_threshold=0.1"], ["cache.residual_dif_threshold", "residual_diff_threshold"]),
        ("flux_fbcache", ["+model.tiny_sed=1"], ["model.tiny_sed", "tiny_seed"]),
        ("flux_fbcache", ["+sed=1"], ["sed is not a field", "seed"]),
        # `~key` removes a field: refused, not silently back at its default
        ("flux_fbcache", ["~prompt"], ["prompt cannot be removed"]),
        ("flux_fbcache", ["~cache.start"], ["cache.start cannot be removed"]),
        ("flux_fbcache", ["num_frames=5"], ["num_frames=5", "flux makes images"]),
        ("flux_fbcache", ["model.num_frames=5"], ["model.num_frames=5", "flux makes images"]),
    ],
)
def test_bad_input_fails_at_compose_time_naming_field_value_and_allowed(recipe, overrides, expected):
    with pytest.raises(ConfigError) as err:
        accel.compose(recipe, overrides)
    message = str(err.value)
    for fragment in expected:
        assert fragment in message
    assert "Config search path" not in message


def test_users_recipe_folders_join_the_search_path(tmp_path, monkeypatch):
    (tmp_path / "my_fast_flux.yaml").write_text(textwrap.dedent("""
        defaults:
          - override /model: flux_tiny
          - override /cache: fbcache
        cache:
          residual_diff_threshold: 0.2
        steps: 12
    """))
    monkeypatch.setenv("ACCEL_RECIPES", str(tmp_path))
    cfg = accel.compose("my_fast_flux")
    assert cfg.cache.residual_diff_threshold == 0.2 and cfg.job.steps == 12 and cfg.model.source == "tiny"


def test_a_recipe_naming_code_to_import_is_refused(tmp_path, monkeypatch):
    (tmp_path / "evil.yaml").write_text(textwrap.dedent("""
        hydra:
          callbacks:
            boom:
              _target_: os.system
              command: echo owned
    """))
    monkeypatch.setenv("ACCEL_RECIPES", str(tmp_path))
    with pytest.raises(ConfigError, match="_target_"):
        accel.compose("evil")


def test_target_in_a_group_field_is_refused_too():
    with pytest.raises(ConfigError, match="_target_"):
        accel.compose("flux_fbcache", ["+cache._target_=os.system"])


def test_every_stage_has_a_none_option_and_stages_run_in_documented_order():
    assert registry.STAGES == ("quant", "attention", "parallel", "cache", "compile")
    for stage in registry.STAGES:
        assert "none" in registry.names(stage)
    assert "fbcache" in registry.names("cache")


def test_plain_dict_configs_are_validated_like_recipes():
    def build(node):
        return registry.build_config("cache", node)[0]

    assert build({"strategy": "fbcache", "residual_diff_threshold": 0.2}).residual_diff_threshold == 0.2
    with pytest.raises(ConfigError, match="cache.*residual_diff_threshold"):
        build({"strategy": "fbcache", "residual_diff_threshold": -1})
    with pytest.raises(ConfigError, match="fbcache"):
        build({"strategy": "warp_drive"})
    with pytest.raises(ConfigError, match="bogus"):
        build({"strategy": "fbcache", "bogus": 1})


def test_a_recipes_data_round_trips_through_yaml():
    cfg = accel.compose("flux_fbcache", ["model=flux_tiny"])
    assert Recipe.from_dict(OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg.to_dict())))) == cfg


def test_overrides_given_as_one_string_say_what_is_expected():
    with pytest.raises(ConfigError, match=r"list of 'key=value' strings"):
        accel.compose("flux_fbcache", overrides="model=flux_tiny")


def test_every_stage_of_the_registry_is_in_every_composed_recipe_and_every_strategy_is_an_option():
    cfg = accel.compose("flux_fbcache")
    assert list(cfg.stages()) == list(registry.STAGES)
    for strategy in registry.strategies():
        chosen = accel.compose(None, [f"{strategy.stage}={strategy.name}"])
        assert getattr(chosen, strategy.stage).strategy == strategy.name


def test_replay_recipes_name_every_stage(tmp_path, monkeypatch):
    from accel.job import write_replay_recipe

    cfg = accel.compose("flux_teacache", ["model=flux_tiny", "cache.coefficients=[0,0,0,1.0,0.5]"])
    write_replay_recipe(cfg, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert all(f"override /{stage}: {config.strategy}" in text for stage, config in cfg.stages().items())
    monkeypatch.setenv("ACCEL_RECIPES", str(tmp_path))
    assert accel.compose("recipe") == cfg
