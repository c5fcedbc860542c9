"""accel: faster diffusion pipelines from declarative Hydra recipes.

    cfg = accel.compose("flux_fbcache", overrides=["model=flux_tiny"])
    pipe = accel.load_pipeline(cfg.model)
    with accel.apply(pipe, cfg) as run:
        image = pipe(prompt="a red fox").images[0]
        print(run.stats())
"""
from accel.api import Run, apply, compose, load_pipeline
from accel.errors import AccelError, ConfigError

__version__ = "0.1.0"
__all__ = ["compose", "load_pipeline", "apply", "Run", "AccelError", "ConfigError"]
