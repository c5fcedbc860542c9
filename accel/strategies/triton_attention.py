"""attention=accel_triton: our own Triton attention kernel (accel.kernels.attention) for every
`torch.nn.functional.scaled_dot_product_attention` call of the denoiser.

The kernel is a layer of the SDPA route (accel.sdpa_route) on the denoiser's attention processors:
diffusers' dispatcher's `native` backend and processors that call torch's SDPA themselves
(AttnProcessor2_0, JointAttnProcessor2_0, ...) alike, and nothing else: the text encoders (CLIP's
causal mask, T5's position bias) and the VAE (one head of 512 channels) call SDPA in ways the kernel
does not take, and the time is in the denoiser. The kernel is a custom op, so torch.compile traces it
into the compiled blocks with no graph break; under sequence parallelism the sharded attention's
calls reach it.

A call the kernel does not take (a mask that is not per key, causal, dropout, GQA, ...) raises an
AccelError naming what it got; with `fallback: true` torch's SDPA runs it instead, and `stats()`
counts such calls by reason. The doctor, and `apply`, refuse where the kernel cannot run at all: no
triton, no CUDA GPU (unless TRITON_INTERPRET=1), a float32 model, head dims over 256.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Optional

import torch

from accel import intercept, sdpa_route
from accel.context import ApplyContext
from accel.errors import AccelError, require
from accel.registry import register
from accel.strategies.attention import head_dim_of

fallbacks: collections.Counter = collections.Counter()  # SDPA calls torch ran instead, per reason, as they ran


@dataclass(frozen=True)
class TritonAttentionConfig:
    strategy: str = "accel_triton"
    qk: str = "bf16"  # bf16: Q·K^T in the model's half type | int8: SageAttention-style 8-bit Q·K^T
    fallback: bool = False  # true: torch's SDPA runs the calls the kernel does not take, counted in stats

    def __post_init__(self):
        from accel.kernels.attention import QK_KINDS

        require(self.qk in QK_KINDS, "qk", self.qk, f"one of {', '.join(QK_KINDS)}")


def triton_problems(device: torch.device, dtype: str, head_dim: int) -> list[str]:
    """Why the kernel cannot run for a model of `dtype` and `head_dim` on `device`, one line each."""
    refused = "strategy='accel_triton' is not allowed"
    if importlib.util.find_spec("triton") is None:
        return [f"{refused}: it needs the triton package (pip install triton; Linux)"]
    from accel.kernels.attention import HALF_TYPES, MAX_HEAD_DIM, unavailable

    problems = []
    missing = unavailable(device)
    if missing is not None:
        problems.append(f"{refused}: {missing}")
    if dtype not in [str(t).replace("torch.", "") for t in HALF_TYPES]:
        problems.append(f"{refused} with model.dtype={dtype!r}: the kernel takes float16 and bfloat16 inputs "
                        "(set model.dtype=bfloat16)")
    if head_dim > MAX_HEAD_DIM:
        problems.append(f"{refused}: the model's head dim is {head_dim} and the kernel takes up to {MAX_HEAD_DIM}")
    return problems


def check_triton(facts, config: TritonAttentionConfig) -> list[str]:
    denoiser = facts.configs["denoiser"] if facts.configs is not None else None
    return triton_problems(facts.device, facts.model.dtype, head_dim_of(denoiser))


@torch.library.custom_op("accel::counted_sdpa", mutates_args=())
def counted_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
                 reason: str) -> torch.Tensor:
    """torch's SDPA for a call the kernel does not take, counted under `reason` when it runs (a custom op,
    so that compiled graphs count it too)."""
    fallbacks[reason] += 1
    out = sdpa_route.TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()


@counted_sdpa.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, reason):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def triton_layer(qk: str, fallback: bool) -> sdpa_route.Layer:
    """The SDPA-route layer that runs our kernel for the calls it takes (the others: torch's, counted, or refused)."""
    from accel.kernels.attention import attention, attention_problem

    def layer(call_next, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        problem = attention_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if problem is None:
            return attention(query, key, value, attn_mask, scale, qk)
        if not fallback:
            raise AccelError(f"attention.strategy='accel_triton' cannot run this attention call: {problem} "
                             "(attention.fallback=true runs torch's SDPA for such calls)")
        return counted_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, problem)

    return layer


class TritonAttentionHandle:
    def __init__(self, ctx: ApplyContext, config: TritonAttentionConfig):
        self.config = config
        self._start = self._counts()
        self._undo = contextlib.ExitStack()
        self._undo.callback(sdpa_route.add_layer(ctx.denoiser, "attention", triton_layer(config.qk, config.fallback)))
        self._undo.callback(intercept.around_each(ctx.pipe, "__call__", "attention", self._generation))

    def _counts(self) -> tuple[int, collections.Counter]:
        from accel.kernels.attention import launches

        return launches[self.config.qk], collections.Counter(fallbacks)

    @contextlib.contextmanager
    def _generation(self):
        self._start = self._counts()
        yield

    def stats(self) -> dict[str, Any]:
        """Calls in the latest generation (counted process-wide: pipelines run at the same time count together)."""
        (launched, fell_back), (launched_before, fell_back_before) = self._counts(), self._start
        fell_back -= fell_back_before
        return {"qk": self.config.qk, "kernel_calls": launched - launched_before,
                "fallback_calls": sum(fell_back.values()), "fallbacks": dict(fell_back)}

    def remove(self) -> None:
        self._undo.close()


@register("accel_triton", stage="attention", config_cls=TritonAttentionConfig, check=check_triton)
def apply_triton(ctx: ApplyContext, config: TritonAttentionConfig) -> TritonAttentionHandle:
    """Our Triton FlashAttention-2 kernel (bf16 or SageAttention-style int8 Q·K^T) for the denoiser's SDPA calls."""
    denoiser = ctx.denoiser
    dtype = str(getattr(denoiser, "dtype", torch.float32)).replace("torch.", "")
    problems = triton_problems(ctx.device, dtype, head_dim_of(getattr(denoiser, "config", None)))
    if problems:
        raise AccelError(f"attention.{problems[0]}")
    return TritonAttentionHandle(ctx, config)
