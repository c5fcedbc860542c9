"""Our Triton attention kernel (accel/kernels/attention.py) and `attention=accel_triton`, run in Triton's
interpreter on the CPU. TRITON_INTERPRET=1 is set for this module by a fixture, after triton was imported
without it (below, on purpose, as another test module or torch.compile may have done in the same
pytest-xdist worker): the kernels read the variable when they launch, are jitted per mode on first use,
and call none of triton's standard library, which was jitted at import for the mode of that moment.

Tolerances: max |ours - reference|, the reference being torch's math SDPA in float32 on the same bf16
inputs (q, k, v from N(0, 1)):
- bf16 path: 2e-2 (measured <= 1.2e-2 over 36 shapes and seeds; torch's own bf16 SDPA on this CPU: <= 4.3e-3;
  ours rounds P to bf16 for P·V, as FlashAttention-2 does); with float16 inputs 2e-3 (measured 5e-4);
- int8 Q·K^T path: 4e-2 (measured <= 2.8e-2, mean 1.7e-3; float16 inputs 2.2e-2).
Tiny FLUX in bf16 (4 steps, 32x32, 32 text + 64 image tokens), PSNR of its image against torch's SDPA:
measured 50 dB for both paths; asserted >= 40 dB (bf16) and >= 35 dB (int8).
"""
import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import accel
from accel.doctor import diagnose
from accel.errors import AccelError, ConfigError
from tests.helpers import generate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the kernels need triton")
if importlib.util.find_spec("triton") is not None:
    import triton.language  # noqa: F401  before TRITON_INTERPRET is set (see above)

BF16_ATOL = 2e-2
FP16_ATOL = 2e-3
INT8_ATOL = 4e-2
MIN_PSNR = {"bf16": 40.0, "int8": 35.0}
CALL = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=32)  # 96 tokens: 1.5 blocks of keys
FLUX_ATTENTION_CALLS = 10  # per step: tiny FLUX's 2 double- and 8 single-stream blocks
NO_GPU = "its Triton kernel needs a CUDA GPU, not cpu (set TRITON_INTERPRET=1 to run it in Triton's interpreter"


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(scope="module")
def flux_bf16():
    model = accel.compose(None, ["model=flux_tiny", "model.dtype=bfloat16"]).model
    pipe = accel.load_pipeline(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate(pipe, **CALL)


def accel_triton(qk="bf16", **fields):
    return {"attention": {"strategy": "accel_triton", "qk": qk, **fields}}


def qkv(batch=2, heads=2, tokens=37, head_dim=64, dtype=torch.bfloat16, key_tokens=None, key_offset=0.0, seed=0):
    """q, k, v as diffusers hands them to SDPA: (batch, tokens, heads, head dim) transposed, so strided."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, head_dim, generator=generator)
    k, v = (torch.randn(batch, key_tokens or tokens, heads, head_dim, generator=generator) for _ in range(2))
    k = k + key_offset * torch.randn(head_dim, generator=generator)  # the same offset on every token
    return tuple(x.transpose(1, 2).to(dtype) for x in (q, k, v))


def reference(q, k, v, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)


def max_error(out, expected):
    return (out.float() - expected).abs().max().item()


def psnr(image, reference_image):
    return (10 * torch.log10(1 / (image.float() - reference_image.float()).pow(2).mean())).item()


# --- the kernel -----------------------------------------------------------------------------------------------------


# every token count with a large and a small head dim. The interpreter's blocks are 128 queries and 64 keys:
# 37, 100 and 130 end in partial blocks, 100 and 130 take several blocks of keys; 16 and 12 pad the head dim
@pytest.mark.parametrize("tokens, head_dim", [(1, 64), (1, 12), (37, 128), (37, 16), (100, 64), (100, 12), (130, 128),
                                              (130, 16)])
def test_the_kernel_matches_torchs_math_attention(tokens, head_dim):
    from accel.kernels.attention import attention

    q, k, v = qkv(tokens=tokens, head_dim=head_dim)
    expected = reference(q, k, v)
    for qk, atol in (("bf16", BF16_ATOL), ("int8", INT8_ATOL)):
        out = attention(q, k, v, qk=qk)
        assert out.dtype == torch.bfloat16 and out.shape == expected.shape
        assert max_error(out, expected) <= atol, qk


def test_float16_cross_attention_with_an_explicit_scale():
    from accel.kernels.attention import attention

    q, k, v = qkv(tokens=50, key_tokens=77, head_dim=80, dtype=torch.float16)
    expected = reference(q, k, v, scale=0.15)
    for qk, atol in (("bf16", FP16_ATOL), ("int8", INT8_ATOL)):
        out = attention(q, k, v, scale=0.15, qk=qk)
        assert out.dtype == torch.float16 and max_error(out, expected) <= atol, qk


def test_int8_smooths_k_so_a_large_offset_shared_by_all_tokens_costs_nothing():
    """An offset on every key shifts each query's scores equally: softmax ignores it, and subtracting K's
    mean keeps it out of the int8 range. Without that the offset would take int8's levels from K's spread."""
    from accel.kernels.attention import attention

    q, k, v = qkv(tokens=130, head_dim=64, key_offset=30.0)
    assert k.float().mean(dim=2).abs().max() > 40  # the offset dwarfs K's own spread (1)
    assert max_error(attention(q, k, v, qk="int8"), reference(q, k, v)) <= INT8_ATOL


def test_a_per_key_mask_boolean_or_additive():
    from accel.kernels.attention import attention

    q, k, v = qkv(tokens=70, head_dim=64)
    keep = torch.rand(2, 70, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[1, :] = False  # every key of the second batch masked: torch gives 0 there, not NaN, and so do we
    masks = {"boolean (batch, 1, 1, keys)": keep[:, None, None, :],
             "additive (batch, 1, 1, keys)": torch.zeros(2, 70).masked_fill(~keep, float("-inf"))[:, None, None, :],
             "boolean (keys,) for every batch": keep[0],
             "additive bf16 bias (1, 1, 1, keys)": torch.linspace(-3, 0, 70, dtype=torch.bfloat16)[None, None, None]}
    for name, mask in masks.items():
        expected = reference(q, k, v, attn_mask=mask if mask.dtype == torch.bool else mask.float())
        for qk, atol in (("bf16", BF16_ATOL), ("int8", INT8_ATOL)):
            assert max_error(attention(q, k, v, attn_mask=mask, qk=qk), expected) <= atol, (name, qk)
    assert reference(q, k, v, attn_mask=keep[:, None, None, :])[1].abs().max() == 0


def _call(**changes):
    q, k, v = qkv(tokens=37, head_dim=64)
    call = dict(query=q, key=k, value=v)
    for name, change in changes.items():
        call[name] = change(call) if callable(change) else change
    return call


REFUSED = {
    "a full mask": (dict(attn_mask=torch.ones(2, 1, 37, 37, dtype=torch.bool)),
                    "attn_mask of shape (2, 1, 37, 37): the kernel takes only a per-key mask, broadcastable to "
                    "(batch, 1, 1, keys) = (2, 1, 1, 37)"),
    "causal": (dict(is_causal=True), "is_causal=True: the kernel is non-causal"),
    "dropout": (dict(dropout_p=0.1), "dropout_p=0.1: the kernel is inference only and takes no dropout"),
    "GQA": (dict(key=lambda c: c["key"][:, :1], value=lambda c: c["value"][:, :1], enable_gqa=True),
            "query has 2 heads and key/value 1/1: the kernel takes no grouped-query attention"),
    "float32": (dict(query=lambda c: c["query"].float(), key=lambda c: c["key"].float(),
                     value=lambda c: c["value"].float()),
                "query/key/value are float32/float32/float32: the kernel takes float16 or bfloat16"),
    "head dim 320": (dict(query=lambda c: c["query"].repeat(1, 1, 1, 5), key=lambda c: c["key"].repeat(1, 1, 1, 5),
                          value=lambda c: c["value"].repeat(1, 1, 1, 5)),
                     "head dim 320: the kernel takes head dims up to 256"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_calls_the_kernel_does_not_take_are_refused_or_fall_back_counted(case):
    from accel.sdpa_route import TORCH_SDPA
    from accel.strategies.triton_attention import fallbacks, triton_layer

    changes, message = REFUSED[case]
    call = _call(**changes)
    with pytest.raises(AccelError, match="^attention.strategy='accel_triton' cannot run this attention call: "
                                         f"{re.escape(message)}.*attention.fallback=true"):
        triton_layer("bf16", fallback=False)(TORCH_SDPA, **call)
    before = fallbacks.copy()
    out = triton_layer("bf16", fallback=True)(TORCH_SDPA, **call)
    counted = fallbacks - before
    assert len(counted) == 1 and next(iter(counted)).startswith(message) and sum(counted.values()) == 1
    if case != "dropout":  # dropout draws random numbers: the same call again would differ
        assert torch.equal(out, F.scaled_dot_product_attention(**call))


def test_the_kernel_is_inference_only():
    from accel.kernels.attention import attention

    q, k, v = qkv()
    with pytest.raises(ValueError, match="inputs require grad: the kernel is inference only"):
        attention(q.requires_grad_(), k, v)


def test_the_custom_op_traces_with_fullgraph_and_checks_out():
    from accel.kernels.attention import attention

    q, k, v = qkv(tokens=20, head_dim=16)
    mask = torch.arange(20) < 15
    for qk in ("bf16", "int8"):
        compiled = torch.compile(lambda q, k, v: attention(q, k, v, attn_mask=mask, qk=qk), backend="eager",
                                 fullgraph=True)
        assert torch.equal(compiled(q, k, v), attention(q, k, v, attn_mask=mask, qk=qk))
    torch.library.opcheck(torch.ops.accel.triton_attention, (q, k, v, None, 0.25, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch._dynamo.reset()


# --- attention=accel_triton -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk", ["bf16", "int8"])
def test_tiny_flux_in_bfloat16_against_sdpa_and_remove_restores_it(flux_bf16, qk):
    pipe, baseline = flux_bf16
    pipeline_class = type(pipe)
    with accel.apply(pipe, accel_triton(qk)) as run:
        out = generate(pipe, **CALL)
        stats = run.stats()["attention"]
    assert stats == {"strategy": "accel_triton", "qk": qk, "kernel_calls": CALL["num_inference_steps"] *
                     FLUX_ATTENTION_CALLS, "fallback_calls": 0, "fallbacks": {}}
    assert not torch.equal(out, baseline) and psnr(out, baseline) >= MIN_PSNR[qk]
    assert type(pipe) is pipeline_class and "forward" not in vars(pipe.transformer)
    assert torch.equal(generate(pipe, **CALL), baseline)


def test_calls_routed_through_accels_attention_layers_reach_the_kernel(flux_bf16):
    """The parallel stage puts its layers on the processors' SDPA route (accel.sdpa_route) at the sequence
    slot, above the kernel's: each of their calls must still reach the kernel."""
    from accel.sdpa_route import add_layer

    pipe, _ = flux_bf16
    layer_calls = []

    def layer(call_next, query, key, value, **kwargs):
        layer_calls.append(query.shape)
        return call_next(query, key, value, **kwargs)

    call = dict(CALL, num_inference_steps=1)
    with accel.apply(pipe, accel_triton()):
        alone = generate(pipe, **call)
    remove_layer = add_layer(pipe.transformer, "sequence", layer)
    try:
        with accel.apply(pipe, accel_triton()) as run:
            routed = generate(pipe, **call)
            stats = run.stats()["attention"]
    finally:
        remove_layer()
    assert len(layer_calls) == FLUX_ATTENTION_CALLS and stats["kernel_calls"] == FLUX_ATTENTION_CALLS
    assert torch.equal(routed, alone)


def test_hunyuan_videos_text_padding_mask_takes_the_kernel_and_its_refiners_full_mask_falls_back():
    """HunyuanVideo's blocks mask padded text tokens per key (batch, 1, 1, tokens): the kernel takes that.
    Its token refiner masks (batch, heads, text, text): refused, or with fallback run by torch and counted."""
    model = accel.compose(None, ["model=hunyuan_video_tiny", "model.dtype=bfloat16"]).model
    pipe = accel.load_pipeline(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, height=32, width=32, num_frames=5, max_sequence_length=16)
    baseline = generate(pipe, **call)
    refiner_mask = "attn_mask of shape (1, 2, 16, 16): the kernel takes only a per-key mask"
    with pytest.raises(AccelError, match=f"cannot run this attention call: {re.escape(refiner_mask)}"):
        with accel.apply(pipe, accel_triton()):
            generate(pipe, **call)
    with accel.apply(pipe, accel_triton(fallback=True)) as run:
        out = generate(pipe, **call)
        stats = run.stats()["attention"]
    assert stats["kernel_calls"] == 2 * 4 and stats["fallback_calls"] == 2 * 1  # a step: 4 in blocks, 1 in the refiner
    assert list(stats["fallbacks"]) == [f"{refiner_mask}, broadcastable to (batch, 1, 1, keys) = (1, 1, 1, 16)"]
    assert psnr(out, baseline) >= MIN_PSNR["bf16"]  # measured 47 dB
    assert torch.equal(generate(pipe, **call), baseline)


GRAPH_OPS = []  # what the recording backend below saw dynamo put in its graphs


def _record_graph_ops(graph_module, example_inputs):
    GRAPH_OPS.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
    return graph_module.forward  # dynamo's eager backend, that is


if "accel_test_graph_ops" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_record_graph_ops, name="accel_test_graph_ops")


def test_compiled_blocks_trace_the_mode_and_the_kernel_without_graph_breaks(flux_bf16):
    """The mode is entered outside the compiled blocks; dynamo must still put our op in their graphs (run
    eagerly, the mode would also catch a plain SDPA left in a graph, so the graphs themselves are read)."""
    pipe, _ = flux_bf16
    call = dict(CALL, num_inference_steps=1)
    with accel.apply(pipe, accel_triton()):
        eager = generate(pipe, **call)
    torch._dynamo.reset()
    GRAPH_OPS.clear()
    try:
        recipe = {**accel_triton(), "compile": {"strategy": "torch", "backend": "accel_test_graph_ops"}}
        with accel.apply(pipe, recipe) as run:
            compiled = generate(pipe, **call)
            stats = run.stats()
    finally:
        torch._dynamo.reset()
    assert stats["compile"]["graph_breaks"] == 0 and stats["compile"]["graphs"] >= 2
    assert "accel.triton_attention" in GRAPH_OPS and not any("scaled_dot_product" in op for op in GRAPH_OPS)
    assert stats["attention"]["kernel_calls"] == FLUX_ATTENTION_CALLS
    assert torch.equal(compiled, eager)  # the graphs run eagerly: the same kernels


def test_the_doctor_and_apply_refuse_a_float32_model(pipe):
    problems = diagnose(accel.compose(None, ["model=flux_tiny", "attention=accel_triton", "device=cpu"]))
    assert problems == ["attention.strategy='accel_triton' is not allowed with model.dtype='float32': the kernel "
                        "takes float16 and bfloat16 inputs (set model.dtype=bfloat16)"]
    pipeline_class = type(pipe)
    with pytest.raises(AccelError, match="^attention.strategy='accel_triton' is not allowed with "
                                         "model.dtype='float32'.*set model.dtype=bfloat16"):
        accel.apply(pipe, accel_triton())
    assert type(pipe) is pipeline_class and "forward" not in vars(pipe.transformer)


def test_on_the_cpu_it_runs_only_in_the_interpreter(flux_bf16, monkeypatch):
    pipe, baseline = flux_bf16
    overrides = ["model=flux_tiny", "model.dtype=bfloat16", "attention=accel_triton", "device=cpu"]
    assert diagnose(accel.compose(None, overrides)) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    problems = diagnose(accel.compose(None, overrides))
    assert len(problems) == 1 and problems[0].startswith(f"attention.strategy='accel_triton' is not allowed: {NO_GPU}")
    with pytest.raises(AccelError, match=f"^attention.strategy='accel_triton' is not allowed: {re.escape(NO_GPU)}"):
        accel.apply(pipe, accel_triton())
    assert "forward" not in vars(pipe.transformer)


def test_an_unknown_qk_fails_at_compose():
    with pytest.raises(ConfigError, match="^attention.qk='int4' is not allowed: one of bf16, int8"):
        accel.compose(None, ["attention=accel_triton", "attention.qk=int4"])
