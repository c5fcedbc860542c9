"""The attention stage: which kernel computes attention.

`attention=sdpa` restricts PyTorch's `scaled_dot_product_attention` to one kernel (`flash`, `efficient`,
`cudnn`, `math`) by entering `torch.nn.attention.sdpa_kernel` around every pipeline call; it reaches
every processor that calls torch's SDPA, diffusers' dispatcher's `native` backend included.
`attention=diffusers` sets diffusers' attention-dispatcher backend (`native`, `_native_math`, `flash`,
`sage`, `xformers`, `flex`, ...) on each attention processor of the denoiser, and puts every
processor's previous backend back on `remove()`.

Both ask first whether the kernel runs here, by running it once on a few tiny tensors of the model's
dtype and head size on the run's device (and, for the dispatcher, diffusers' own requirement and
constraint checks). A kernel that does not run is refused, saying what is missing, both by the doctor
and by `apply`; `fallback: true` runs the default instead (`auto`, `native`) and `stats()` says so and why.
"""
from __future__ import annotations

import collections
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from accel import intercept
from accel.context import ApplyContext
from accel.errors import AccelError, require
from accel.registry import BYPASSES_TORCH_SDPA, register

# ---------------------------------------------------------------------------------------------------------------------
# Probing a kernel on a device
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_HEAD_DIM = 64

# what torch needs for each of its SDPA kernels, said where it cannot run on a device that is no CUDA GPU
_SDPA_NEEDS = {
    "efficient": "torch's memory-efficient SDPA kernel runs on CUDA GPUs only",
    "cudnn": "torch's cuDNN SDPA kernel runs on CUDA GPUs only (with cuDNN 9, on GPUs its attention supports)",
    "flash": "torch's flash SDPA kernel runs on CUDA GPUs (fp16/bf16) and on the CPU",
}


def head_dim_of(denoiser_config: Any) -> int:
    """The per-head size the model attends with, from its config (`attention_head_dim`), else 64."""
    value = denoiser_config.get("attention_head_dim") if denoiser_config is not None else None
    return value if isinstance(value, int) and 0 < value <= 1024 else DEFAULT_HEAD_DIM


def _probe(run: Callable[[], Any]) -> Optional[str]:
    """Run `run()` without gradients; None if it ran, else why not (its error and torch's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                run()
            return None
        except Exception as err:  # noqa: BLE001  any failure means the kernel does not run here
            error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            # torch's guess assumes someone turned the kernels off; here the one kernel asked for cannot run
            error = error.replace(" This is likely due to turning off both the math kernel and the fused kernels.", "")
    reasons = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught
                                 if issubclass(w.category, UserWarning)))
    return "; ".join([error, *reasons])


def _where(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    return f"{device} with {str(dtype).replace('torch.', '')} (head dim {head_dim})"


# ---------------------------------------------------------------------------------------------------------------------
# attention=sdpa
# ---------------------------------------------------------------------------------------------------------------------

SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


def _sdpa_backend(kernel: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]


@dataclass(frozen=True)
class SDPAConfig:
    strategy: str = "sdpa"
    kernel: str = "auto"  # auto (torch chooses per call) | flash | efficient | cudnn | math
    fallback: bool = False  # true: where the kernel does not run here, run with auto and say so in stats

    def __post_init__(self):
        require(self.kernel in SDPA_KERNELS, "kernel", self.kernel, f"one of {', '.join(SDPA_KERNELS)}")


def sdpa_problem(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why torch's SDPA `kernel` does not run on `device` for this dtype and head size; None if it does."""
    if kernel == "auto":
        return None
    from torch.nn.attention import sdpa_kernel

    def run():
        q = torch.randn(1, 2, 8, head_dim, device=device, dtype=dtype)
        with sdpa_kernel([_sdpa_backend(kernel)]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)

    failure = _probe(run)
    if failure is None:
        return None
    need = f"{_SDPA_NEEDS[kernel]}, and " if kernel in _SDPA_NEEDS and device.type != "cuda" else ""
    return (f"{need}it does not run on {_where(device, dtype, head_dim)}: torch says: {failure} (use "
            "attention.kernel=auto, or attention.fallback=true to run with auto wherever it does not run)")


def check_sdpa(facts, config: SDPAConfig) -> list[str]:
    if config.fallback:
        return []
    denoiser = facts.configs["denoiser"] if facts.configs is not None else None
    problem = sdpa_problem(config.kernel, facts.device, getattr(torch, facts.model.dtype), head_dim_of(denoiser))
    return [] if problem is None else [f"kernel={config.kernel!r} is not allowed: {problem}"]


class SDPAHandle:
    def __init__(self, kernel: str, requested: str, fallback: Optional[str], remove_hook: Callable[[], None]):
        self.kernel, self.requested, self.fallback = kernel, requested, fallback
        self._remove_hook = remove_hook

    def stats(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "requested": self.requested, "fallback": self.fallback is not None,
                "fallback_reason": self.fallback}

    def remove(self) -> None:
        self._remove_hook()
        self._remove_hook = lambda: None


@register("sdpa", stage="attention", config_cls=SDPAConfig, check=check_sdpa)
def apply_sdpa(ctx: ApplyContext, config: SDPAConfig) -> SDPAHandle:
    """PyTorch SDPA restricted to one kernel (flash, efficient, cudnn, math) around every pipeline call."""
    denoiser = ctx.denoiser
    dtype = getattr(denoiser, "dtype", torch.float32)
    problem = sdpa_problem(config.kernel, ctx.device, dtype, head_dim_of(getattr(denoiser, "config", None)))
    kernel, fallback = config.kernel, None
    if problem is not None:
        if not config.fallback:
            raise AccelError(f"attention.kernel={config.kernel!r} is not allowed: {problem}")
        kernel, fallback = "auto", f"kernel={config.kernel!r} does not run here: {problem}"
    if kernel == "auto":  # no restriction: torch's own choice, and nothing to hook
        return SDPAHandle(kernel, config.kernel, fallback, lambda: None)
    from torch.nn.attention import sdpa_kernel

    backends = [_sdpa_backend(kernel)]
    return SDPAHandle(kernel, config.kernel, fallback,
                      intercept.around_each(ctx.pipe, "__call__", "attention", lambda: sdpa_kernel(backends)))


# ---------------------------------------------------------------------------------------------------------------------
# attention=diffusers
# ---------------------------------------------------------------------------------------------------------------------

_UNSET = object()  # a processor that had no `_attention_backend` of its own (it read its class's None)


@functools.lru_cache(maxsize=None)
def dispatcher_backends() -> tuple[str, ...]:
    """Every backend name diffusers' attention dispatcher knows (`AttentionBackendName`), `_hub` ones included."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(member.value for member in AttentionBackendName)


@dataclass(frozen=True)
class DiffusersAttentionConfig:
    strategy: str = "diffusers"
    backend: str = "native"  # a diffusers AttentionBackendName: native, _native_math, flash, sage, xformers, flex, ...
    fallback: bool = False  # true: where the backend does not run here, use native and say so in stats

    def __post_init__(self):
        require(not self.backend.endswith("_hub"), "backend", self.backend,
                "a backend that runs from installed packages: the *_hub backends download their kernels from the "
                "Hugging Face Hub at run time, and nothing may download here; install the kernel's package and "
                "name its backend instead (flash: flash-attn, sage: sageattention, xformers: xformers)")
        allowed = [name for name in dispatcher_backends() if not name.endswith("_hub")]
        require(self.backend in allowed, "backend", self.backend, f"one of diffusers' attention backends: "
                                                                  f"{', '.join(allowed)}")


def dispatcher_problem(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why diffusers' dispatcher backend `backend` does not run on `device`; None if it does. Asks diffusers'
    own requirement check (packages and versions), then the backend's registered constraints and one
    call of it on tiny tensors (device, dtype, kernels torch has here)."""
    from diffusers.models import attention_dispatch as dispatch

    name = dispatch.AttentionBackendName(backend)
    try:
        dispatch._check_attention_backend_requirements(name)
    except Exception as err:  # noqa: BLE001  diffusers raises RuntimeError naming the missing package
        return f"diffusers says: {err}"
    registry = dispatch._AttentionBackendRegistry
    q = torch.randn(1, 8, 2, head_dim, device=device, dtype=dtype)  # (batch, sequence, heads, head dim)
    checks = list(registry._constraints.get(name, []))

    def constraints():
        for check in checks:
            check(query=q, key=q, value=q, attn_mask=None, is_causal=False)

    failure = _probe(constraints)
    if failure is not None:
        return f"it does not run on {_where(device, dtype, head_dim)}: diffusers' check says: {failure}"
    failure = _probe(lambda: registry._backends[name](query=q, key=q, value=q))
    if failure is not None:
        sdpa = {"_native_flash": "flash", "_native_efficient": "efficient", "_native_cudnn": "cudnn"}.get(backend)
        need = f"{_SDPA_NEEDS[sdpa]}, and " if sdpa and device.type != "cuda" else ""
        return f"{need}it does not run on {_where(device, dtype, head_dim)}: torch says: {failure}"
    return None


def _attention_classes() -> tuple[type, ...]:
    """The modules `ModelMixin.set_attention_backend` visits."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    return (Attention, MochiAttention, AttentionModuleMixin)


def check_diffusers(facts, config: DiffusersAttentionConfig) -> list[str]:
    if config.fallback:
        return []
    denoiser = facts.configs["denoiser"] if facts.configs is not None else None
    problem = dispatcher_problem(config.backend, facts.device, getattr(torch, facts.model.dtype),
                                 head_dim_of(denoiser))
    return [] if problem is None else [f"backend={config.backend!r} is not allowed: {problem}"]


class DiffusersAttentionHandle:
    def __init__(self, backend: str, requested: str, fallback: Optional[str], saved: list[tuple[Any, Any]],
                 skipped: dict[str, int]):
        self.backend, self.requested, self.fallback = backend, requested, fallback
        self._saved = saved  # (processor, its own previous _attention_backend or _UNSET)
        self.skipped = skipped

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend, "requested": self.requested, "fallback": self.fallback is not None,
                "fallback_reason": self.fallback, "modules": len(self._saved) if self._saved is not None else 0,
                "not_dispatched": dict(self.skipped)}

    def remove(self) -> None:
        _restore(self._saved or [])
        self._saved = None


def _restore(saved: list[tuple[Any, Any]]) -> None:
    for processor, previous in saved:
        if previous is _UNSET:
            vars(processor).pop("_attention_backend", None)
        else:
            processor._attention_backend = previous


def _diffusers_traits(config: DiffusersAttentionConfig) -> set[str]:
    """Backends other than the native ones call their own kernels, not torch's SDPA by its name."""
    return set() if config.backend == "native" or config.backend.startswith("_native") else {BYPASSES_TORCH_SDPA}


@register("diffusers", stage="attention", config_cls=DiffusersAttentionConfig, check=check_diffusers,
          traits=_diffusers_traits)
def apply_diffusers(ctx: ApplyContext, config: DiffusersAttentionConfig) -> DiffusersAttentionHandle:
    """diffusers' attention-dispatcher backend (native, _native_math, flash, sage, flex, ...) per processor."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    denoiser = ctx.denoiser
    processors, skipped = {}, collections.Counter()
    for module in denoiser.modules():
        if isinstance(module, _attention_classes()) and getattr(module, "processor", None) is not None:
            if hasattr(module.processor, "_attention_backend"):
                processors[id(module.processor)] = module.processor
            else:
                skipped[type(module.processor).__name__] += 1
    if not processors:
        raise AccelError(
            f"attention.strategy='diffusers' does not apply to this {type(denoiser).__name__}: its attention "
            f"processors ({', '.join(sorted(skipped)) or 'none found'}) do not go through diffusers' attention "
            "dispatcher, so a dispatcher backend would change nothing; attention=sdpa chooses the kernel of "
            "processors that call torch's SDPA")
    problem = dispatcher_problem(config.backend, ctx.device, getattr(denoiser, "dtype", torch.float32),
                                 head_dim_of(getattr(denoiser, "config", None)))
    backend, fallback = config.backend, None
    if problem is not None:
        if not config.fallback:
            raise AccelError(f"attention.backend={config.backend!r} is not allowed: {problem}")
        backend, fallback = "native", f"backend={config.backend!r} does not run here: {problem}"
    saved = [(p, vars(p).get("_attention_backend", _UNSET)) for p in processors.values()]
    active = _AttentionBackendRegistry._active_backend
    try:
        denoiser.set_attention_backend(backend)
    except ValueError as err:  # e.g. a backend that does not support the context parallelism set on the model
        _restore(saved)
        raise AccelError(f"attention.backend={backend!r} is not allowed: diffusers says: {err}") from None
    except BaseException:
        _restore(saved)
        raise
    finally:
        # set_attention_backend also makes the backend the process-wide default; the backend here is
        # per processor, so other models in the process keep theirs
        _AttentionBackendRegistry._active_backend = active
    return DiffusersAttentionHandle(backend, config.backend, fallback, saved, dict(skipped))
