"""accel: faster diffusion pipelines from declarative Hydra recipes.

    recipe = accel.compose("flux_fbcache", overrides=["model=flux_tiny"])
    pipe = accel.load_pipeline(recipe.model)
    with accel.apply(pipe, recipe) as run:
        image = pipe(prompt="a red fox").images[0]
        print(run.stats())
"""
from accel import quiet  # noqa: F401  first: silences what a user cannot act on, before torchao and diffusers load
from accel.api import Run, apply, compose, load_pipeline
from accel.errors import AccelError, ConfigError
from accel.recipe import Recipe

__version__ = "0.1.0"
__all__ = ["compose", "load_pipeline", "apply", "Run", "Recipe", "AccelError", "ConfigError"]
