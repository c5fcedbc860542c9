"""The attention stage on real tiny pipelines: `sdpa` (torch's SDPA kernel per pipeline call) and
`diffusers` (diffusers' attention-dispatcher backend per processor). Kernels that do not run here are
refused by the doctor and by `apply`, naming what is missing; `fallback` says in stats what it did;
`remove()` leaves every processor and the output exactly as they were.

On this CPU torch's `auto` picks its CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`),
not math: so `kernel=flash` equals the baseline bit for bit and `kernel=math` differs from it in the
last bits, and equals a baseline run inside `sdpa_kernel(MATH)` bit for bit.
"""
import collections
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import accel
from accel.doctor import diagnose
from accel.errors import AccelError, ConfigError
from tests.helpers import generate, tiny_pipeline

CPU_FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"
# math vs torch's CPU flash kernel, flux_tiny at 8 steps: measured max |diff| 8.3e-7 (sdpa), 7.2e-7 (dispatcher)
MATH_TOLERANCE = 1e-5


def sdpa(kernel, **fields):
    return {"attention": {"strategy": "sdpa", "kernel": kernel, **fields}}


def dispatcher(backend, **fields):
    return {"attention": {"strategy": "diffusers", "backend": backend, **fields}}


class AttentionOps(TorchDispatchMode):
    """Counts the aten attention ops that really run: torch's fused CPU flash kernel, or math's softmax."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name or "softmax" in name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def attention_ops(pipe, **call) -> collections.Counter:
    with AttentionOps() as ops:
        generate(pipe, num_inference_steps=1, **call)
    return ops.counts


def sdp_flags():
    return (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())


def processor_backends(denoiser):
    """Per attention module: its processor object and the processor's *own* `_attention_backend`
    ("unset": it reads its class's default), read here independently of the strategy's code."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return {name: (m.processor, vars(m.processor).get("_attention_backend", "unset"))
            for name, m in denoiser.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))}


def active_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry._active_backend


def untouched(pipe):
    """Nothing of a run is left on the pipeline."""
    assert "_accel_call_hooks" not in vars(pipe) and "_accel_run" not in vars(pipe)
    assert not hasattr(type(pipe), "_accel_original_class")  # the pipeline's own class, not accel's call wrapper


@pytest.fixture(scope="module")
def sd35():
    pipe = tiny_pipeline("sd35_tiny")
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=4)
    return pipe, call, generate(pipe, **call)


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_pipeline("wan_tiny")
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=32, width=32, num_frames=5, num_inference_steps=4)
    return pipe, call, generate(pipe, **call)


# --- attention=sdpa -------------------------------------------------------------------------------------------------


def test_sdpa_auto_is_the_baseline_and_hooks_nothing(pipe, baseline):
    pipeline_class = type(pipe)
    with accel.apply(pipe, sdpa("auto")) as run:
        assert type(pipe) is pipeline_class  # auto restricts nothing, so there is nothing to hook
        assert torch.equal(generate(pipe), baseline)
        assert run.stats()["attention"] == {"strategy": "sdpa", "kernel": "auto", "requested": "auto",
                                            "fallback": False, "fallback_reason": None}


def test_sdpa_math_forces_the_math_kernel(pipe, baseline):
    auto_ops = attention_ops(pipe)
    assert auto_ops[CPU_FLASH] > 0  # what torch picks on this CPU by itself
    with sdpa_kernel([SDPBackend.MATH]):
        math_reference = generate(pipe)
    flags = sdp_flags()
    with accel.apply(pipe, sdpa("math")) as run:
        assert sdp_flags() == flags  # the restriction holds during pipeline calls only
        out = generate(pipe)
        ops = attention_ops(pipe)
        assert run.stats()["attention"]["kernel"] == "math"
    assert sdp_flags() == flags
    assert ops[CPU_FLASH] == 0 and ops["aten._safe_softmax.default"] == auto_ops[CPU_FLASH]  # every call took math
    assert torch.equal(out, math_reference)
    assert not torch.equal(out, baseline) and (out - baseline).abs().max() < MATH_TOLERANCE


def test_sdpa_flash_is_torchs_cpu_flash_kernel_here(pipe, baseline):
    with accel.apply(pipe, sdpa("flash")) as run:
        assert torch.equal(generate(pipe), baseline)
        ops = attention_ops(pipe)
        assert run.stats()["attention"]["fallback"] is False
    assert ops[CPU_FLASH] > 0 and ops["aten._safe_softmax.default"] == 0


@pytest.mark.parametrize("kernel, missing", [("efficient", "memory-efficient SDPA kernel runs on CUDA GPUs only"),
                                             ("cudnn", "cuDNN SDPA kernel runs on CUDA GPUs only")])
def test_sdpa_cuda_kernels_are_refused_on_the_cpu_by_apply_and_the_doctor(pipe, baseline, kernel, missing):
    with pytest.raises(AccelError, match=f"^attention.kernel='{kernel}' is not allowed: torch's {missing}.*cpu"):
        accel.apply(pipe, sdpa(kernel))
    untouched(pipe)
    assert torch.equal(generate(pipe), baseline)
    problems = diagnose(accel.compose(None, ["model=flux_tiny", "attention=sdpa", f"attention.kernel={kernel}"]))
    assert len(problems) == 1
    assert problems[0].startswith(f"attention.kernel='{kernel}' is not allowed: torch's {missing}")
    assert diagnose(accel.compose(None, ["model=flux_tiny", "attention=sdpa", "attention.kernel=math"])) == []


def test_sdpa_fallback_runs_auto_and_says_why(pipe, baseline):
    with accel.apply(pipe, sdpa("efficient", fallback=True)) as run:
        assert torch.equal(generate(pipe), baseline)
        stats = run.stats()["attention"]
    assert stats["kernel"] == "auto" and stats["requested"] == "efficient" and stats["fallback"] is True
    assert "memory-efficient SDPA kernel runs on CUDA GPUs only" in stats["fallback_reason"]
    overrides = ["model=flux_tiny", "attention=sdpa", "attention.kernel=efficient", "attention.fallback=true"]
    assert diagnose(accel.compose(None, overrides)) == []


def test_sdpa_remove_restores_the_pipeline_exactly(pipe, baseline):
    pipeline_class = type(pipe)
    run = accel.apply(pipe, sdpa("math"))
    assert type(pipe) is not pipeline_class
    generate(pipe)
    run.remove()
    assert type(pipe) is pipeline_class
    untouched(pipe)
    assert torch.equal(generate(pipe), baseline)
    assert attention_ops(pipe)[CPU_FLASH] > 0


def test_sdpa_reaches_processors_that_call_torch_directly(sd35):
    """SD3's JointAttnProcessor2_0 calls torch's SDPA itself, not diffusers' dispatcher; batched CFG."""
    pipe, call, baseline = sd35
    assert attention_ops(pipe)[CPU_FLASH] > 0
    with accel.apply(pipe, sdpa("auto")):
        assert torch.equal(generate(pipe, **call), baseline)
    with sdpa_kernel([SDPBackend.MATH]):
        reference = generate(pipe, **call)
    with accel.apply(pipe, sdpa("math")):
        assert torch.equal(generate(pipe, **call), reference)
        assert attention_ops(pipe)[CPU_FLASH] == 0
    assert torch.equal(generate(pipe, **call), baseline)


# --- attention=diffusers ----------------------------------------------------------------------------------------------


def test_dispatcher_native_is_bit_identical_and_every_module_reports_it(pipe, baseline):
    from diffusers.models.attention_dispatch import AttentionBackendName

    before, global_before = processor_backends(pipe.transformer), active_backend()
    with accel.apply(pipe, dispatcher("native")) as run:
        during = processor_backends(pipe.transformer)
        assert torch.equal(generate(pipe), baseline)
        stats = run.stats()["attention"]
        assert active_backend() == global_before  # per processor only: the process-wide default stays
    assert len(during) == 10 and all(own == AttentionBackendName.NATIVE for _, own in during.values())
    assert stats == {"strategy": "diffusers", "backend": "native", "requested": "native", "fallback": False,
                     "fallback_reason": None, "modules": 10, "not_dispatched": {}}
    assert processor_backends(pipe.transformer) == before


def test_dispatcher_native_math_runs_the_math_kernel_in_the_denoiser(pipe, baseline):
    from diffusers.models.attention_dispatch import AttentionBackendName

    transformer = pipe.transformer
    forward = transformer.forward

    def math_forward(*args, **kwargs):  # the reference: the denoiser alone inside sdpa_kernel(MATH)
        with sdpa_kernel([SDPBackend.MATH]):
            return forward(*args, **kwargs)

    transformer.forward = math_forward
    try:
        reference = generate(pipe)
    finally:
        del transformer.forward
    with accel.apply(pipe, dispatcher("_native_math")):
        assert all(own == AttentionBackendName._NATIVE_MATH for _, own in processor_backends(transformer).values())
        out = generate(pipe)
    assert torch.equal(out, reference)
    assert not torch.equal(out, baseline) and (out - baseline).abs().max() < MATH_TOLERANCE


def test_dispatcher_remove_restores_each_processors_own_backend_and_the_output(pipe, baseline):
    from diffusers.models.attention_dispatch import AttentionBackendName

    processors = [p for p, _ in processor_backends(pipe.transformer).values()]
    processors[0]._attention_backend = AttentionBackendName.NATIVE  # one set by its owner; the rest unset
    try:
        before, global_before = processor_backends(pipe.transformer), active_backend()
        assert before[next(iter(before))][1] == "native" and sum(own == "unset" for _, own in before.values()) == 9
        run = accel.apply(pipe, dispatcher("_native_math"))
        assert all(own == "_native_math" for _, own in processor_backends(pipe.transformer).values())
        assert not torch.equal(generate(pipe), baseline)
        run.remove()
        assert processor_backends(pipe.transformer) == before  # the same processors, each with its own state
        assert active_backend() == global_before
        untouched(pipe)
        assert torch.equal(generate(pipe), baseline)
    finally:
        vars(processors[0]).pop("_attention_backend", None)


@pytest.mark.parametrize("backend", ["flash_hub", "sage_hub", "_flash_3_hub", "flash_4_hub", "aiter_fa2_hub"])
def test_hub_backends_are_refused_at_compose(pipe, backend):
    with pytest.raises(ConfigError, match=f"attention.backend='{backend}' is not allowed: .*download.*at run time"):
        accel.compose(None, ["model=flux_tiny", "attention=diffusers", f"attention.backend={backend}"])
    with pytest.raises(ConfigError, match="download"):
        accel.apply(pipe, dispatcher(backend))
    untouched(pipe)


def test_an_unknown_backend_lists_diffusers_backends():
    with pytest.raises(ConfigError, match="attention.backend='flash2' is not allowed: one of .*_native_math.*sage"):
        accel.compose(None, ["attention=diffusers", "attention.backend=flash2"])


@pytest.mark.parametrize("backend, package", [("flash", "flash-attn"), ("sage", "sageattention"),
                                              ("xformers", "xformers"), ("_flash_3", "FA3")])
def test_a_backend_whose_package_is_missing_is_refused_naming_it(pipe, baseline, backend, package):
    module = {"flash": "flash_attn", "sage": "sageattention", "xformers": "xformers",
              "_flash_3": "flash_attn_interface"}
    if importlib.util.find_spec(module[backend]) is not None:
        pytest.skip(f"{module[backend]} is installed here")
    before = processor_backends(pipe.transformer)
    with pytest.raises(AccelError, match=f"^attention.backend='{backend}' is not allowed: diffusers says: .*{package}"):
        accel.apply(pipe, dispatcher(backend))
    assert processor_backends(pipe.transformer) == before
    untouched(pipe)
    assert torch.equal(generate(pipe), baseline)
    problems = diagnose(accel.compose(None, ["model=flux_tiny", "attention=diffusers", f"attention.backend={backend}"]))
    assert len(problems) == 1 and package in problems[0] and problems[0].startswith("attention.backend=")


@pytest.mark.parametrize("backend, why", [
    ("_native_efficient", "torch's memory-efficient SDPA kernel runs on CUDA GPUs only"),
    ("_native_cudnn", "diffusers' check says: Query, key, and value must be either bfloat16 or float16"),
    ("_native_flash", "diffusers' check says: Query, key, and value must be either bfloat16 or float16"),
])
def test_a_backend_that_does_not_run_on_this_device_is_refused_saying_why(pipe, backend, why):
    before = processor_backends(pipe.transformer)
    with pytest.raises(AccelError, match=f"attention.backend='{backend}' is not allowed: .*{why}"):
        accel.apply(pipe, dispatcher(backend))
    assert processor_backends(pipe.transformer) == before
    problems = diagnose(accel.compose(None, ["model=flux_tiny", "attention=diffusers", f"attention.backend={backend}"]))
    assert len(problems) == 1 and why in problems[0]


def test_dispatcher_fallback_runs_native_and_says_why(pipe, baseline):
    from diffusers.models.attention_dispatch import AttentionBackendName

    before = processor_backends(pipe.transformer)
    with accel.apply(pipe, dispatcher("flash", fallback=True)) as run:
        assert all(own == AttentionBackendName.NATIVE for _, own in processor_backends(pipe.transformer).values())
        assert torch.equal(generate(pipe), baseline)
        stats = run.stats()["attention"]
    assert stats["backend"] == "native" and stats["requested"] == "flash" and stats["fallback"] is True
    assert "flash-attn" in stats["fallback_reason"]
    assert processor_backends(pipe.transformer) == before
    overrides = ["model=flux_tiny", "attention=diffusers", "attention.backend=flash", "attention.fallback=true"]
    assert diagnose(accel.compose(None, overrides)) == []


def test_dispatcher_refuses_a_model_whose_processors_do_not_dispatch(sd35):
    pipe, call, baseline = sd35
    before = processor_backends(pipe.transformer)
    with pytest.raises(AccelError, match="SD3Transformer2DModel: its attention processors \\(JointAttnProcessor2_0\\) "
                                         "do not go through diffusers' attention dispatcher.*attention=sdpa"):
        accel.apply(pipe, dispatcher("native", fallback=True))
    assert processor_backends(pipe.transformer) == before
    untouched(pipe)
    assert torch.equal(generate(pipe, **call), baseline)


def test_dispatcher_on_wan(wan):
    from diffusers.models.attention_dispatch import AttentionBackendName

    pipe, call, baseline = wan
    before = processor_backends(pipe.transformer)
    with accel.apply(pipe, dispatcher("native")):
        assert torch.equal(generate(pipe, **call), baseline)
    with accel.apply(pipe, dispatcher("_native_math")) as run:
        during = processor_backends(pipe.transformer)
        out = generate(pipe, **call)
        assert run.stats()["attention"]["modules"] == len(during) == 4
    assert all(own == AttentionBackendName._NATIVE_MATH for _, own in during.values())
    assert (out - baseline).abs().max() < MATH_TOLERANCE
    assert processor_backends(pipe.transformer) == before
    assert torch.equal(generate(pipe, **call), baseline)


# --- with a cache, and from the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [sdpa("math")["attention"], dispatcher("_native_math")["attention"]])
def test_attention_and_fbcache_apply_together_and_remove_cleanly(pipe, baseline, attention):
    before = processor_backends(pipe.transformer)
    with accel.apply(pipe, {"attention": attention}):
        alone = generate(pipe)
    recipe = {"attention": attention, "cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}}
    with accel.apply(pipe, recipe) as run:
        assert torch.equal(generate(pipe), alone)  # threshold 0 caches nothing: the attention kernel alone
        stats = run.stats()
    assert stats["attention"]["strategy"] == attention["strategy"] and stats["cache"]["computed"] == 8
    recipe["cache"]["residual_diff_threshold"] = 1e9
    with accel.apply(pipe, recipe) as run:
        generate(pipe)
        assert run.stats()["cache"]["cached"] == 7
    untouched(pipe)
    assert processor_backends(pipe.transformer) == before
    assert all("forward" not in vars(b) for b in [*pipe.transformer.transformer_blocks,
                                                  *pipe.transformer.single_transformer_blocks])
    assert torch.equal(generate(pipe), baseline)


def test_the_cli_refuses_a_kernel_that_does_not_run_here_before_the_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "accel", "recipe=flux_attention", "model=flux_tiny",
                             "attention.kernel=efficient"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2, result.stderr
    assert "attention.kernel='efficient' is not allowed: torch's memory-efficient SDPA kernel runs on CUDA GPUs only" \
        in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()
