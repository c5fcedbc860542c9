"""torchao quantization (`quant=torchao`) on the tiny FLUX pipeline: closeness, memory, the module
filter, exact removal, float8 refused off float8 GPUs, and quantization under a cache."""
import math

import pytest
import torch

import accel
from accel.doctor import diagnose
from accel.errors import AccelError, ConfigError
from accel.strategies.quant import DEFAULT_EXCLUDE, FLOAT8_KINDS, KINDS, param_bytes, tensor_bytes
from tests.helpers import generate

# Measured on flux_tiny (float32, 8 steps, 64x64, seeds 0-2) with torchao 0.18 and torch 2.13 CPU:
# int8_weight_only max |Δ| 0.0004-0.0005 and PSNR 81.7-83.0 dB against the float image; int8_dynamic
# 0.0005-0.0006 and 80.0-81.0 dB; quantizing every linear layer (exclude=[], min_features=0) 0.003 and
# 65 dB. The bounds leave ~10x room over the measured error and still catch the unfiltered model.
MAX_ABS = 5e-3  # on the decoded image, values in [0, 1]
MIN_PSNR_DB = 70.0


def quant(kind: str = "int8_weight_only", **fields) -> dict:
    return {"quant": {"strategy": "torchao", "kind": kind, **fields}}


def psnr(out: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((out - reference) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def linears(pipe) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def is_plain(weight) -> bool:
    return type(weight) is torch.nn.Parameter and type(weight.data) is torch.Tensor


def snapshot(pipe) -> dict:
    """Every linear weight of the transformer: the Parameter object, a copy of its values, its dtype
    and requires_grad."""
    return {name: (m.weight, m.weight.detach().clone(), m.weight.dtype, m.weight.requires_grad)
            for name, m in linears(pipe).items()}


def assert_as_before(pipe, before: dict) -> None:
    for name, m in linears(pipe).items():
        weight, values, dtype, requires_grad = before[name]
        assert m.weight is weight and is_plain(m.weight), name
        assert m.weight.dtype == dtype and m.weight.requires_grad == requires_grad, name
        assert torch.equal(m.weight, values), name
        assert "extra_repr" not in m.__dict__, name  # quantize_ sets one on the instance


@pytest.fixture(scope="module")
def int8_output(pipe, baseline):
    """The int8 weight-only image and the run's stats, with the transformer as it was while applied."""
    before = snapshot(pipe)
    with accel.apply(pipe, quant()) as run:
        out = generate(pipe)
        stats = run.stats()["quant"]
        quantized = {name: m.weight for name, m in linears(pipe).items() if not is_plain(m.weight)}
    return out, stats, quantized, before


def test_int8_weight_only_stays_close_to_the_baseline(int8_output, baseline):
    out, _, _, _ = int8_output
    assert torch.isfinite(out).all()
    assert not torch.equal(out, baseline)  # it really computed with int8 weights
    assert (out - baseline).abs().max().item() < MAX_ABS
    assert psnr(out, baseline) > MIN_PSNR_DB


def test_the_stats_count_the_real_bytes_of_the_quantized_weights(int8_output):
    _, stats, quantized, before = int8_output
    assert stats["strategy"] == "torchao" and stats["kind"] == "int8_weight_only"
    assert stats["layers_quantized"] == len(quantized) > 0
    assert stats["param_bytes_after"] < stats["param_bytes_before"]
    # A quantized weight holds one int8 per value plus per-row scales (a plain numel * element_size would
    # still say float32: 4 bytes per value, and no saving at all).
    float_bytes = sum(before[name][1].numel() * before[name][1].element_size() for name in quantized)
    values = sum(before[name][1].numel() for name in quantized)
    saved = stats["param_bytes_before"] - stats["param_bytes_after"]
    assert float_bytes - 1.25 * values <= saved <= float_bytes - values
    assert sum(tensor_bytes(w) for w in quantized.values()) == stats["param_bytes_after"] - (
        stats["param_bytes_before"] - float_bytes)
    assert stats["param_bytes_ratio"] == pytest.approx(stats["param_bytes_after"] / stats["param_bytes_before"],
                                                       abs=1e-4)


def test_remove_gives_back_the_same_weights_and_the_baseline_bit_for_bit(pipe, baseline, int8_output):
    _, _, _, before = int8_output  # taken before that run, which was removed when it ended
    assert_as_before(pipe, before)
    assert param_bytes(pipe.transformer) == sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert torch.equal(generate(pipe), baseline)


def test_the_filter_keeps_embedders_norms_and_the_final_projection_float(pipe):
    before = snapshot(pipe)
    kept = ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
            "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear", "norm_out.linear",
            "proj_out"]
    converted = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.proj_out", "single_transformer_blocks.7.attn.to_v"]
    with accel.apply(pipe, quant()) as run:
        layers = linears(pipe)
        for name in kept:
            assert layers[name].weight is before[name][0] and is_plain(layers[name].weight), name
            assert torch.equal(layers[name].weight, before[name][1]), name
        for name in converted:
            assert not is_plain(layers[name].weight), name
        assert run.stats()["quant"]["layers_quantized"] == sum(not is_plain(m.weight) for m in layers.values())
    assert_as_before(pipe, before)


@pytest.mark.parametrize("fields, expected, count", [
    # tiny FLUX: attention projections are 32x32 = 1024 weights, feed-forward ones 32x128 or 128x32,
    # single blocks' proj_out 160x32; 2 double-stream and 8 single-stream blocks
    ({"min_features": 32 * 32 + 1}, lambda name, m: m.in_features * m.out_features > 32 * 32, 2 * 4 + 8 * 2),
    ({"include": ["single_transformer_blocks.*"]},
     lambda name, m: name.startswith("single_transformer_blocks.") and ".norm." not in name, 8 * 5),
    ({"include": ["*.attn.to_?"], "exclude": ["single_*"]},
     lambda name, m: name.startswith("transformer_blocks.") and name[-5:] in (".to_q", ".to_k", ".to_v"), 2 * 3),
])
def test_include_exclude_and_min_features_choose_the_layers(pipe, int8_output, fields, expected, count):
    before = snapshot(pipe)
    default = set(int8_output[2])  # what the default filter quantized
    with accel.apply(pipe, quant(**fields)) as run:
        layers = linears(pipe)
        chosen = {name for name, m in layers.items() if not is_plain(m.weight)}
        assert run.stats()["quant"]["layers_quantized"] == len(chosen) == count
        assert chosen == {name for name, m in layers.items()
                          if expected(name, m) and ("exclude" in fields or name in default)}
    assert_as_before(pipe, before)


def test_the_option_and_the_dataclass_agree_on_the_default_filter():
    cfg = accel.compose(None, ["quant=torchao"]).quant
    assert cfg.kind == "int8_weight_only" and list(cfg.exclude) == list(DEFAULT_EXCLUDE) and list(cfg.include) == ["*"]
    assert accel.compose("flux_int8", ["model=flux_tiny"]).quant.kind == "int8_weight_only"


def test_int8_dynamic_runs_on_the_cpu_and_comes_off_exactly(pipe, baseline):
    before = snapshot(pipe)
    with accel.apply(pipe, quant("int8_dynamic")) as run:
        out = generate(pipe)
        assert run.stats()["quant"]["layers_quantized"] > 0
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert (out - baseline).abs().max().item() < MAX_ABS and psnr(out, baseline) > MIN_PSNR_DB
    assert_as_before(pipe, before)
    assert torch.equal(generate(pipe), baseline)


def _float8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("kind", FLOAT8_KINDS)
def test_float8_is_refused_off_a_float8_gpu_at_apply_and_by_the_doctor(pipe, kind):
    before = snapshot(pipe)
    with pytest.raises(AccelError, match=rf"quant\.kind='{kind}' is not allowed: needs a CUDA GPU of compute "
                                         r"capability >= 8\.9 .*cpu"):
        accel.apply(pipe, quant(kind))  # the tiny pipeline is on the CPU
    assert_as_before(pipe, before)
    with accel.apply(pipe, quant()):  # nothing was left applied
        pass
    overrides = ["model=flux_tiny", "quant=torchao", f"quant.kind={kind}"] + (["device=cpu"] if _float8_gpu() else [])
    problems = diagnose(accel.compose(None, overrides))
    assert len(problems) == 1
    assert problems[0].startswith(f"quant.kind='{kind}' is not allowed: needs a CUDA GPU of compute capability >= 8.9")


def test_int8_kinds_pass_the_doctor_on_the_cpu():
    for kind in ("int8_weight_only", "int8_dynamic"):
        assert diagnose(accel.compose(None, ["model=flux_tiny", "quant=torchao", f"quant.kind={kind}",
                                             "device=cpu"])) == []


def test_a_bad_kind_or_granularity_is_refused_at_compose():
    with pytest.raises(ConfigError, match=r"quant\.kind='int4' is not allowed: one of " + ", ".join(KINDS)):
        accel.compose(None, ["quant=torchao", "quant.kind=int4"])
    with pytest.raises(ConfigError, match=r"quant\.granularity='tensorwise' is not allowed: .*float8_dynamic only"):
        accel.compose(None, ["quant=torchao", "quant.granularity=tensorwise"])
    assert accel.compose(None, ["quant=torchao", "quant.kind=float8_dynamic",
                                "quant.granularity=tensorwise"]).quant.granularity == "tensorwise"
    with pytest.raises(ConfigError, match=r"quant\.min_features=-1 is not allowed"):
        accel.compose(None, ["quant=torchao", "quant.min_features=-1"])


def test_a_failure_part_way_through_leaves_the_model_as_it_was(pipe, monkeypatch):
    import torchao.quantization

    real, calls = torchao.quantization.quantize_, []

    def failing(model, config, filter_fn=None, **kwargs):
        calls.append(model)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(model, config, filter_fn=filter_fn, **kwargs)

    monkeypatch.setattr(torchao.quantization, "quantize_", failing)
    before = snapshot(pipe)
    with pytest.raises(RuntimeError, match="simulated"):
        accel.apply(pipe, quant())
    assert len(calls) == 3
    assert_as_before(pipe, before)


def test_int8_under_first_block_cache_applies_and_comes_off_to_the_baseline(pipe, baseline, int8_output):
    before = snapshot(pipe)
    exact = {"strategy": "fbcache", "residual_diff_threshold": 0.0}  # computes every step
    with accel.apply(pipe, {**quant(), "cache": exact}) as run:
        assert torch.equal(generate(pipe), int8_output[0])  # the cache sees the quantized blocks, nothing else
        stats = run.stats()
    assert stats["quant"]["layers_quantized"] == int8_output[1]["layers_quantized"] and stats["cache"]["cached"] == 0
    caching = {"strategy": "fbcache", "residual_diff_threshold": 1e9, "max_consecutive_hits": 1}
    run = accel.apply(pipe, {**quant(), "cache": caching})
    out = generate(pipe)
    assert run.stats()["cache"]["cached"] > 0 and torch.isfinite(out).all()
    run.remove()
    assert_as_before(pipe, before)
    assert torch.equal(generate(pipe), baseline)
