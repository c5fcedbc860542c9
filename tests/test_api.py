"""The Python API's own mistakes get one clear AccelError, never a raw traceback from deep inside."""
import pytest

import accel
from accel.errors import AccelError, ConfigError


def test_a_recipe_of_another_family_is_refused(pipe):
    sdxl = accel.compose("sdxl_fbcache")
    with pytest.raises(AccelError, match=r"^this recipe is for sdxl models \(model.architecture\) and this "
                                         r"FluxPipeline is a flux pipeline"):
        accel.apply(pipe, sdxl)
    assert type(pipe).__name__ == "FluxPipeline" and "_accel_layers" not in vars(pipe)
    # its stages alone apply, as a dict
    with accel.apply(pipe, {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.2}}) as run:
        assert run.stats()["cache"]["strategy"] == "fbcache"


@pytest.mark.parametrize("recipe, message", [
    (None, "accel.apply takes a recipe name, a Recipe (accel.compose) or a dict of stage configs"),
    (42, "accel.apply takes a recipe name, a Recipe (accel.compose) or a dict of stage configs"),
    ({"cahce": {"strategy": "fbcache"}}, "'cahce' is not a stage of a recipe"),
])
def test_apply_says_what_a_recipe_is(pipe, recipe, message):
    with pytest.raises(AccelError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        accel.apply(pipe, recipe)


def test_apply_takes_a_diffusers_pipeline():
    with pytest.raises(AccelError, match=r"^accel.apply takes a diffusers pipeline .*; got object"):
        accel.apply(object(), {"cache": {"strategy": "fbcache"}})


def test_load_pipeline_refuses_a_device_it_cannot_name_before_loading():
    with pytest.raises(ConfigError, match=r"^device='tpu' is not allowed: auto, cpu, cuda or cuda:N"):
        accel.load_pipeline("flux_tiny", device="tpu")
    with pytest.raises(AccelError, match="load_pipeline takes a model option name, a ModelConfig"):
        accel.load_pipeline({"architecture": "flux"})


def test_the_registry_is_complete_after_import_accel():
    import subprocess
    import sys

    code = "import accel; from accel import registry; print(registry.names('compile'), registry.names('cache'))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'torch'" in printed and "'fbcache'" in printed and "'teacache'" in printed
