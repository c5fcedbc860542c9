"""accel: faster diffusion pipelines from declarative Hydra recipes.

    cfg = accel.compose("flux_fbcache", overrides=["model=flux_tiny"])
    pipe = accel.load_pipeline(cfg.model)
    with accel.apply(pipe, cfg) as run:
        image = pipe(prompt="a red fox").images[0]
        print(run.stats())
"""
import logging

from accel.api import Run, apply, compose, load_pipeline
from accel.errors import AccelError, ConfigError

__version__ = "0.1.0"

# transformers warns on first use of an image processor that torchvision is missing and it falls back
# to PIL; the pipelines here never process input images, so a user has nothing to act on.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
__all__ = ["compose", "load_pipeline", "apply", "Run", "AccelError", "ConfigError"]
