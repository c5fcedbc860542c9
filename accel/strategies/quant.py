"""Weight quantization of the denoiser's linear layers with torchao (`quant=torchao quant.kind=...`).

The chosen `nn.Linear` layers get their weight replaced by a torchao tensor subclass (int8 or float8
data plus scales) through `torchao.quantization.quantize_`; everything else stays as it was. That is
in place and lossy, so the handle keeps each replaced weight's original `Parameter` object and puts
it back on `remove()`: the model is then bit for bit the one it was before.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from accel.context import ApplyContext
from accel.errors import AccelError, require
from accel.registry import register

KINDS = ("int8_weight_only", "int8_dynamic", "float8_dynamic", "float8_weight_only")
FLOAT8_KINDS = ("float8_dynamic", "float8_weight_only")
GRANULARITIES = ("rowwise", "tensorwise")
FLOAT8_CAPABILITY = (8, 9)  # Ada Lovelace / Hopper and later: the first GPUs with float8 tensor cores

# Module names (fnmatch, on the denoiser's `named_modules()` names) left in floating point by default,
# on FLUX, SD3, Wan, HunyuanVideo and the SDXL UNet alike. Only nn.Linear layers are ever quantized,
# so norms themselves (LayerNorm, RMSNorm, GroupNorm) never are; `*norm*` keeps the linear layers
# inside them (AdaLN modulation: `norm1.linear`, `norm_out.linear`) in float too, as they scale and
# shift every activation of a block.
DEFAULT_EXCLUDE = (
    "*embed*",  # patch / text / timestep / guidance embedders: x_embedder, context_embedder, time_text_embed.*,
    #             Wan's condition_embedder.*, SDXL's time_embedding.* and add_embedding.*
    "time_*",  # top-level time projections (time_proj, time_embedding)
    "*time_emb_proj",  # the UNet resnets' projection of the time embedding
    "*norm*",  # AdaLN modulation linears in every block and the final norm_out.linear
    "proj_out",  # the final projection to latent channels (only the top-level one: block proj_out stays in)
)


@dataclass(frozen=True)
class TorchaoQuantConfig:
    strategy: str = "torchao"
    kind: str = "int8_weight_only"  # int8_weight_only | int8_dynamic | float8_dynamic | float8_weight_only
    granularity: str = "rowwise"  # float8_dynamic's scales: rowwise | tensorwise; the other kinds are rowwise
    include: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns on module names
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    min_features: int = 1024  # layers with in_features * out_features below this stay in float

    def __post_init__(self):
        require(self.kind in KINDS, "kind", self.kind, f"one of {', '.join(KINDS)}")
        require(self.granularity in GRANULARITIES, "granularity", self.granularity,
                f"one of {', '.join(GRANULARITIES)}")
        require(self.granularity == "rowwise" or self.kind == "float8_dynamic", "granularity", self.granularity,
                f"rowwise with kind={self.kind} (tensorwise scales are for kind=float8_dynamic only)")
        require(self.min_features >= 0, "min_features", self.min_features, ">= 0")


def _float8_problem(device: torch.device) -> Optional[str]:
    """Why float8 kinds cannot run on `device`, or None when they can."""
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability >= FLOAT8_CAPABILITY:
            return None
        found = f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
    else:
        found = f"this device: {device}"
    return (f"needs a CUDA GPU of compute capability >= {FLOAT8_CAPABILITY[0]}.{FLOAT8_CAPABILITY[1]} "
            f"(float8 tensor cores: Ada, Hopper or later; {found}); use kind=int8_weight_only or int8_dynamic here")


def _torchao_problem() -> Optional[str]:
    if importlib.util.find_spec("torchao") is None:
        return "strategy='torchao' needs the torchao package: pip install 'torchao>=0.15'"
    version = importlib.metadata.version("torchao")
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < (0, 15):
        return f"strategy='torchao' needs torchao >= 0.15 (found {version}): pip install -U torchao"
    return None


def check_torchao(facts, config: TorchaoQuantConfig) -> list[str]:
    """Before anything loads: torchao is installed, and float8 kinds have a GPU that computes in float8."""
    problems = []
    missing = _torchao_problem()
    if missing:
        problems.append(missing)
    if config.kind in FLOAT8_KINDS:
        problem = _float8_problem(facts.device)
        if problem:
            problems.append(f"kind={config.kind!r} is not allowed: {problem}")
    return problems


def _torchao_config(config: TorchaoQuantConfig):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow, PerTensor)
    # set_inductor_config=False: torchao would otherwise change torch._inductor.config process-wide,
    # which remove() could not undo; the compile stage owns those settings.
    if config.kind == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if config.kind == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if config.kind == "float8_weight_only":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    granularity = PerRow() if config.granularity == "rowwise" else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor really holds. A torchao weight is a wrapper subclass whose own numel and
    element_size describe the logical float tensor; its data lives in inner tensors (int8 or float8
    values, scales, zero points), which `__tensor_flatten__` names."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def param_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in module.parameters())


def select_layers(denoiser: torch.nn.Module, config: TorchaoQuantConfig) -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear layers to quantize: a name matching some `include` and no `exclude` pattern, at
    least `min_features` weights, a plain floating-point weight of their own (not already quantized,
    not shared with another module)."""
    owners = Counter(id(p) for m in denoiser.modules() for p in m._parameters.values() if p is not None)
    chosen = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        plain = type(weight) is torch.nn.Parameter and type(weight.data) is torch.Tensor
        if not (plain and weight.is_floating_point() and weight.device.type != "meta" and owners[id(weight)] == 1):
            continue
        if module.in_features * module.out_features < config.min_features:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.include) and \
                not any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            chosen.append((name, module))
    return chosen


@dataclass
class _Saved:
    """A quantized layer as it was: its weight Parameter (the object itself, so references held
    elsewhere stay valid) and the device it lived on, and its instance `extra_repr` if it had one."""

    module: torch.nn.Linear
    weight: torch.nn.Parameter
    device: torch.device
    extra_repr: Any


_ABSENT = object()


class TorchaoHandle:
    def __init__(self, denoiser: torch.nn.Module, config: TorchaoQuantConfig):
        self.denoiser = denoiser
        self.config = config
        self.saved: list[_Saved] = []
        self.bytes_before = param_bytes(denoiser)
        self.bytes_after = self.bytes_before
        self.linear_layers = sum(isinstance(m, torch.nn.Linear) for m in denoiser.modules())

    def quantize(self, layers: list[tuple[str, torch.nn.Linear]]) -> None:
        from torchao.quantization import quantize_
        recipe = _torchao_config(self.config)
        for name, linear in layers:
            saved = _Saved(linear, linear.weight, linear.weight.device, linear.__dict__.get("extra_repr", _ABSENT))
            self.saved.append(saved)  # before quantizing, so a failure part-way is undone by remove()
            # One layer per call: its original weight can leave the accelerator before the next layer is
            # quantized, so peak memory is the float model plus one quantized layer, not plus all of them.
            quantize_(linear, recipe, filter_fn=lambda module, fqn, target=linear: module is target)
            if linear.weight is saved.weight:
                raise AccelError(f"quant: torchao did not quantize {name} in place ({type(recipe).__name__}); "
                                 "this torchao version is not supported, install torchao>=0.15")
            # The originals are kept, not reloaded from the model's safetensors at remove(): what is in
            # memory may differ from any file (a fused LoRA, a dtype cast, a pipeline built in code or
            # fetched from the hub cache), and only the tensor itself is sure to give back the same bits.
            # On an accelerator it moves to host memory, so the accelerator memory is really freed; on
            # the CPU it stays where it is (nothing to free: the saving shows in a GPU's memory only).
            if saved.device.type != "cpu":
                saved.weight.data = saved.weight.data.to("cpu")
        self.bytes_after = param_bytes(self.denoiser)

    def stats(self) -> dict[str, Any]:
        quantized = [s.module for s in self.saved if s.module.weight is not s.weight]
        return {
            "kind": self.config.kind,
            **({"granularity": self.config.granularity} if self.config.kind == "float8_dynamic" else {}),
            "layers_quantized": len(quantized),
            "linear_layers": self.linear_layers,
            "param_bytes_before": self.bytes_before,
            "param_bytes_after": self.bytes_after,
            "param_bytes_ratio": round(self.bytes_after / self.bytes_before, 4) if self.bytes_before else None,
            # the float weights kept to give back on remove(), in host memory
            "originals_kept_bytes": sum(tensor_bytes(s.weight) for s in self.saved),
        }

    def remove(self) -> None:
        while self.saved:
            saved = self.saved.pop()
            if saved.weight.device != saved.device:
                saved.weight.data = saved.weight.data.to(saved.device)
            saved.module.weight = saved.weight  # the same Parameter object: dtype and requires_grad as before
            if saved.extra_repr is _ABSENT:
                saved.module.__dict__.pop("extra_repr", None)  # quantize_ sets one on the instance
            else:
                saved.module.__dict__["extra_repr"] = saved.extra_repr
        self.bytes_after = self.bytes_before


@register("torchao", stage="quant", config_cls=TorchaoQuantConfig, check=check_torchao)
def apply_torchao(ctx: ApplyContext, config: TorchaoQuantConfig) -> TorchaoHandle:
    """torchao weight quantization (int8 or float8) of the denoiser's linear layers."""
    missing = _torchao_problem()
    if missing:
        raise AccelError(f"quant.{missing}")
    denoiser = ctx.denoiser
    layers = select_layers(denoiser, config)
    if not layers:
        raise AccelError(f"quant: no nn.Linear of {type(denoiser).__name__} is selected (include={config.include}, "
                         f"exclude={config.exclude}, min_features={config.min_features}): nothing to quantize")
    if config.kind in FLOAT8_KINDS:
        for device in sorted({linear.weight.device for _, linear in layers}, key=str):
            problem = _float8_problem(device)
            if problem:
                raise AccelError(f"quant.kind={config.kind!r} is not allowed: {problem}")
    handle = TorchaoHandle(denoiser, config)
    try:
        handle.quantize(layers)
    except BaseException:
        handle.remove()
        raise
    return handle
