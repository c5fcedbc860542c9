"""Routing the denoiser's attention calls through accel's layers (context parallelism, our kernels).

Every attention processor of the architectures accel supports ends in torch's
`torch.nn.functional.scaled_dot_product_attention`, called directly (SD3, SDXL) or by diffusers'
dispatcher's `native` backend (FLUX, Wan, HunyuanVideo), and both look it up on the module at call
time. While any processor is routed, that name points at `routed_sdpa`, which runs the layers of the
routed processor running now (its routed `__call__` makes them the active ones) and is torch's own
SDPA for every other caller (text encoders, other models). `remove()` puts each processor's own class
back, and torch's function once no routed processor is left.

Why not a TorchFunctionMode: entered inside a compiled region, dynamo cannot trace the Tensor methods
the processors use (`unflatten`, unless the mode re-dispatches them as methods); entered outside, a
minimal mode that calls back into torch inside `__torch_function__` compiled to code that skipped it on
torch 2.13 (wrong outputs, no error). A module attribute and a module global are ordinary code to
dynamo, so routed attention compiles with the blocks, without graph breaks. (attention=accel_triton
does use a mode around the denoiser; its tests check the compiled graphs contain its kernel.)

Layers run in stage order, whatever order they were added in: a layer of a later stage (parallel)
runs first and calls the next one (an attention kernel), which calls torch's SDPA last.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

# layer(call_next, query, key, value, **sdpa_kwargs) -> output; tensors as torch's SDPA takes them
# (batch, heads, tokens, head dim)
Layer = Callable[..., torch.Tensor]
_LAYERS = "_accel_attention_layers"
_TORCH_SDPA = F.scaled_dot_product_attention

_active: Optional[list] = None  # the layers of the routed processor running now
_routed_processors = 0


def _through_layers(layers: list[tuple[int, Layer]], query, key, value, **kwargs) -> torch.Tensor:
    call = _TORCH_SDPA
    for _, layer in sorted(layers, key=lambda entry: entry[0]):  # lowest priority nearest torch's SDPA
        call = functools.partial(layer, call)
    return call(query, key, value, **kwargs)


@functools.wraps(_TORCH_SDPA)
def routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's SDPA, through the running processor's layers when a routed one is running."""
    layers = _active
    if not layers:
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    return _through_layers(layers, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@functools.lru_cache(maxsize=None)
def _routed_class(cls: type) -> type:
    """`cls` whose `__call__` makes the instance's layers the active ones while it runs (same
    signature: diffusers reads the processor's parameters to decide what to pass)."""
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        global _active
        previous, _active = _active, self.__dict__[_LAYERS]
        try:
            return original(self, *args, **kwargs)
        finally:
            _active = previous

    return type(cls.__name__, (cls,), {"__call__": __call__, "_accel_routed_from": cls, "__module__": cls.__module__})


def attention_processors(module: torch.nn.Module) -> list[Any]:
    """The distinct attention processors of a module's attention submodules."""
    found = {}
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is not None and callable(processor) and not isinstance(processor, torch.nn.Module):
            found[id(processor)] = processor
    return list(found.values())


def add_layer(module: torch.nn.Module, priority: int, layer: Layer) -> Callable[[], None]:
    """Put `layer` on every attention processor within `module` (higher `priority` runs first); returns
    what takes it off again, restoring each processor's own class once its last layer is gone."""
    global _routed_processors
    processors = attention_processors(module)
    entry = (priority, layer)
    for processor in processors:
        if _LAYERS not in processor.__dict__:
            cls = type(processor)
            F.scaled_dot_product_attention = routed_sdpa
            processor.__dict__[_LAYERS] = []
            processor.__class__ = _routed_class(cls)
            _routed_processors += 1
        processor.__dict__[_LAYERS].append(entry)

    def remove() -> None:
        global _routed_processors
        for processor in processors:
            layers = processor.__dict__.get(_LAYERS)
            if layers is None:
                continue
            if entry in layers:
                layers.remove(entry)
            if not layers:
                del processor.__dict__[_LAYERS]
                processor.__class__ = type(processor)._accel_routed_from
                _routed_processors -= 1
        if _routed_processors == 0:
            F.scaled_dot_product_attention = _TORCH_SDPA

    return remove
