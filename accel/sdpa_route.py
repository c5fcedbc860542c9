"""Routing the denoiser's attention through accel's layers (sequence parallelism, our kernels).

The second and last interception accel needs, beside `accel.intercept`: the attention processors of
every supported denoiser end in torch's `torch.nn.functional.scaled_dot_product_attention`, called
directly (SD3, SDXL) or by diffusers' dispatcher's `native` backend (FLUX, Wan, HunyuanVideo), and
both look that name up on the module at call time. So while any processor is routed the name points
at `routed_sdpa`, which runs the layers of the routed processor running now (a layer on its
`__call__` makes them the active ones) and is torch's own SDPA for every other caller (text
encoders, the VAE, other models). Why not a TorchFunctionMode: entered outside a compiled region,
dynamo silently skipped a minimal mode on torch 2.13 (wrong outputs, no error), and entered inside
it cannot trace the Tensor methods the processors use; a module attribute and a module global are
ordinary code to dynamo, so routed attention compiles with the blocks without graph breaks.

Layers run in slot order (`accel.intercept.SLOTS`): sequence parallelism's sharded attention first,
calling the next layer (an attention kernel), which calls torch's SDPA last.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from accel import intercept

# layer(call_next, query, key, value, **sdpa_kwargs) -> output; tensors as torch's SDPA takes them
# (batch, heads, tokens, head dim)
Layer = Callable[..., torch.Tensor]
TORCH_SDPA = F.scaled_dot_product_attention
_SDPA_LAYERS = "_accel_sdpa_layers"

_active: Optional[list] = None  # the SDPA layers of the routed processor running now
_routed = 0  # processors routed, across every model in the process


def _through_layers(layers: list[tuple[int, Layer]], query, key, value, **kwargs) -> torch.Tensor:
    call = TORCH_SDPA
    for _, layer in sorted(layers, key=lambda entry: -entry[0]):  # the innermost slot nearest torch's SDPA
        call = functools.partial(layer, call)
    return call(query, key, value, **kwargs)


@functools.wraps(TORCH_SDPA)
def routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's SDPA, through the running processor's layers when a routed one is running."""
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    layers = _active
    if not layers:
        return TORCH_SDPA(query, key, value, **kwargs)
    return _through_layers(layers, query, key, value, **kwargs)


def _activate(layers: list):
    def layer(inner, *args, **kwargs):
        global _active
        previous, _active = _active, layers
        try:
            return inner(*args, **kwargs)
        finally:
            _active = previous

    return layer


def attention_processors(module: torch.nn.Module) -> list[Any]:
    """The distinct attention processors of a module's attention submodules."""
    found = {}
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is not None and callable(processor) and not isinstance(processor, torch.nn.Module):
            found[id(processor)] = processor
    return list(found.values())


def add_layer(module: torch.nn.Module, slot: str, layer: Layer) -> Callable[[], None]:
    """Run `layer` on every SDPA call of the attention processors within `module`, at `slot`; returns
    what takes it off, giving each processor its own class back once its last layer is gone."""
    global _routed
    entry = (intercept.SLOTS.index(slot), layer)
    processors = attention_processors(module)
    for processor in processors:
        if _SDPA_LAYERS not in processor.__dict__:
            layers: list = []
            processor.__dict__[_SDPA_LAYERS] = (layers, intercept.around(processor, "__call__", "attention",
                                                                         _activate(layers)))
            F.scaled_dot_product_attention = routed_sdpa
            _routed += 1
        processor.__dict__[_SDPA_LAYERS][0].append(entry)

    def undo() -> None:
        global _routed
        for processor in processors:
            layers, deactivate = processor.__dict__.get(_SDPA_LAYERS, ([], None))
            if entry not in layers:
                continue
            layers.remove(entry)
            if not layers:
                deactivate()
                del processor.__dict__[_SDPA_LAYERS]
                _routed -= 1
        if _routed == 0:
            F.scaled_dot_product_attention = TORCH_SDPA

    return undo
