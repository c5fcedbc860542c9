"""attention=accel_triton: our own Triton attention kernel (accel.kernels.attention) for every
`torch.nn.functional.scaled_dot_product_attention` call of the denoiser.

A TorchFunctionMode, entered around the denoiser's forward (the top layer of its layered forward),
routes each SDPA call to the kernel: diffusers' dispatcher's `native` backend and processors that call
torch's SDPA themselves (AttnProcessor2_0, JointAttnProcessor2_0, ...) alike. torch.compile traces the
mode and the kernel's custom op into the compiled blocks with no graph break. It wraps the denoiser
rather than the whole pipeline call because the text encoders (CLIP's causal mask, T5's position
bias) and the VAE (one head of 512 channels) call SDPA in ways the kernel does not take, and the time
is in the denoiser.

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
from torch.overrides import TorchFunctionMode

from accel.context import ApplyContext
from accel.errors import AccelError, require
from accel.models.layered_forward import wrap
from accel.pipeline_calls import add_call_hook
from accel.registry import register
from accel.strategies.attention import head_dim_of

# torch's own SDPA: what the mode sees called, also while accel's attention route (accel.models.attention_route,
# used by the parallel stage) has put its routed function under the name F.scaled_dot_product_attention
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
fallbacks: collections.Counter = collections.Counter()  # SDPA calls torch ran instead, per reason, as they ran


@dataclass
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
    with torch._C.DisableTorchFunction():  # compiled graphs run this inside the mode: do not route it again
        out = TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()


@counted_sdpa.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, reason):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


class TritonSDPA(TorchFunctionMode):
    """Routes torch's SDPA calls to our kernel; the others pass through untouched."""

    def __init__(self, qk: str, fallback: bool):
        super().__init__()
        self.qk, self.fallback = qk, fallback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not TORCH_SDPA:
            if getattr(func, "__module__", None) == "torch._tensor":
                # Tensor methods written in Python (unflatten calls super() of a C method, which dynamo cannot
                # trace when the mode hands it the function): call them as methods, which dynamo knows
                return getattr(args[0], func.__name__)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        from accel.kernels.attention import SDPA_ARGUMENTS, attention, attention_problem

        call = dict(zip(SDPA_ARGUMENTS, args), **kwargs)
        problem = attention_problem(**call)
        if problem is None:
            return attention(call["query"], call["key"], call["value"], call.get("attn_mask"), call.get("scale"),
                             self.qk)
        if not self.fallback:
            raise AccelError(f"attention.strategy='accel_triton' cannot run this attention call: {problem} "
                             "(attention.fallback=true runs torch's SDPA for such calls)")
        return counted_sdpa(call["query"], call["key"], call["value"], call.get("attn_mask"),
                            call.get("dropout_p", 0.0), call.get("is_causal", False), call.get("scale"),
                            call.get("enable_gqa", False), problem)


class TritonAttentionHandle:
    def __init__(self, ctx: ApplyContext, config: TritonAttentionConfig):
        self.config = config
        mode = TritonSDPA(config.qk, config.fallback)

        def in_mode(inner, *args, **kwargs):
            with mode:
                return inner(*args, **kwargs)

        self._start = self._counts()
        self._undo = [wrap(ctx.denoiser, in_mode), add_call_hook(ctx.pipe, self._generation)]

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
        while self._undo:
            self._undo.pop()()


@register("accel_triton", stage="attention", config_cls=TritonAttentionConfig, check=check_triton)
def apply_triton(ctx: ApplyContext, config: TritonAttentionConfig) -> TritonAttentionHandle:
    """Our Triton FlashAttention-2 kernel (bf16 or SageAttention-style int8 Q·K^T) for the denoiser's SDPA calls."""
    denoiser = ctx.denoiser
    dtype = str(getattr(denoiser, "dtype", torch.float32)).replace("torch.", "")
    problems = triton_problems(ctx.device, dtype, head_dim_of(getattr(denoiser, "config", None)))
    if problems:
        raise AccelError(f"attention.{problems[0]}")
    return TritonAttentionHandle(ctx, config)
