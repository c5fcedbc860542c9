"""Small shared pieces of the tests: pipelines loaded through the real path, and call counters."""
from __future__ import annotations

import functools

import torch
from omegaconf import OmegaConf

import accel
from accel import resources

STEPS = 8
IDENTITY = [0.0, 0.0, 0.0, 1.0, 0.0]  # TeaCache coefficients of rescale(d) = d (an order-4 polynomial, highest first)


@functools.lru_cache(maxsize=None)
def _model_cfg(model: str):
    return accel.compose(None, [f"model={model}"]).model


@functools.lru_cache(maxsize=None)
def tiny_option(family: str) -> str:
    """A family's embedded tiny model option (conf/model/*.yaml with source: tiny; the plainest one)."""
    options = [p.stem for p in (resources.conf_dir() / "model").glob("*.yaml")
               if OmegaConf.load(p).get("source") == "tiny" and OmegaConf.load(p).get("architecture") == family]
    assert options, f"family {family} has no tiny model option in conf/model/"
    return min(options, key=len)


def tiny_pipeline(model: str = "flux_tiny"):
    """A fresh pipeline, fabricated once per machine and loaded through `from_pretrained`."""
    return accel.load_pipeline(_model_cfg(model), device="cpu")


def generate(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    options = {"prompt": "a red fox in the snow", "num_inference_steps": STEPS, "height": 64, "width": 64,
               "output_type": "pt"}
    options.update(kwargs)
    output = pipe(**options, generator=torch.Generator("cpu").manual_seed(seed))
    return output.frames if hasattr(output, "frames") else output.images


def cache_recipe(**fields) -> dict:
    return {"cache": {"strategy": "fbcache", **fields}}


class CallCounter:
    """Counts how often each block really computes, by hooking a module deep inside it."""

    def __init__(self, modules):
        self.counts = [0] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index):
        def hook(module, args, output):
            self.counts[index] += 1

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def flux_blocks(pipe):
    t = pipe.transformer
    return list(t.transformer_blocks) + list(t.single_transformer_blocks)
