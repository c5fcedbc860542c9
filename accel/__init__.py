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

# Warnings a user has nothing to act on: transformers' fallback to PIL image processors (these
# pipelines process no input images); torchao's CUDA-only kernels failing to load on a machine without
# CUDA, and torch's deprecation notes on its enums; diffusers' note that it cannot read
# torchao-serialized checkpoints (accel loads safetensors).
for _name in ("transformers.utils.import_utils", "torchao", "diffusers.quantizers.torchao.torchao_quantizer",
              "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
__all__ = ["compose", "load_pipeline", "apply", "Run", "AccelError", "ConfigError"]
