"""Messages a user of accel has nothing to act on, filtered where they are logged.

Filters on the loggers themselves, not levels: torch's logging resets the levels of its own loggers
when it initialises, and a filter stays. Each entry names the logger and what its message says; every
other message of these loggers still shows.
"""
from __future__ import annotations

import logging
import warnings

NOISE = {
    # torchao's CUDA kernel libraries failing to load on a CPU build of torch (every import)
    "torchao": ("Failed to load",),
    # torch's deprecation note on torchao's enums (every import of torchao)
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    # diffusers cannot read torchao-serialized checkpoints without torchao's tensors: accel loads safetensors
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    # `from_pipe` and `.to(dtype)` on a model with nothing kept in float32
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
    # accel has found the weights (or said they are missing) before diffusers looks for the hub
    "diffusers.pipelines.pipeline_utils": ("Couldn't connect to the Hub",),
    # transformers' fallback to PIL image processors (these pipelines process no input images)
    "transformers.utils.import_utils": ("torchvision",),
}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


for _name, _fragments in NOISE.items():
    logging.getLogger(_name).addFilter(_Drop(_fragments))

# a torchao weight under compile: torch's AOT cache asks tensor subclasses for a hash torchao does not give
warnings.filterwarnings("ignore", message=r".*does not implement _stable_hash_for_caching")
