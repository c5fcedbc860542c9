"""torch.compile as a stage: blocks compile below every cache kind with fullgraph and no graph breaks,
whatever the order the two were applied in; resolution changes and LoRAs cost counted recompiles;
remove() restores the eager model exactly. Most tests use dynamo's `eager` backend (the same tracing,
no code generation) to stay fast on 2 CPU cores; inductor runs in the composition test."""
import pytest
import torch

import accel
from accel.context import ApplyContext
from accel.errors import AccelError, ConfigError
from accel.strategies.compile import CompileConfig, apply_compile
from accel.strategies.fbcache import FBCacheConfig, apply_fbcache
from tests.helpers import flux_blocks, generate

COMPILE = {"strategy": "torch", "backend": "eager"}
CACHES = [
    {"strategy": "fbcache", "residual_diff_threshold": 0.3},
    {"strategy": "mbcache", "residual_diff_threshold": 0.3, "first_blocks": 2, "last_blocks": 1},
    {"strategy": "mbcache", "residual_diff_threshold": 0.3, "first_blocks": 3, "probe": "per_block"},
    {"strategy": "teacache", "rel_l1_threshold": 0.6},
    {"strategy": "fbcache", "residual_diff_threshold": 0.3, "forecast": "taylor", "forecast_order": 2},
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: f"{c['strategy']}-{c.get('probe', c.get('forecast', ''))}")
def test_blocks_compile_whole_under_every_cache_with_the_eager_hit_map(pipe, cache):
    with accel.apply(pipe, {"cache": cache}) as run:
        eager = generate(pipe)
        eager_hits = run.stats()["cache"]["hit_map"]
    with accel.apply(pipe, {"cache": cache, "compile": COMPILE}) as run:
        compiled = generate(pipe)
        stats = run.stats()
    assert stats["compile"]["graph_breaks"] == 0 and stats["compile"]["graphs"] >= 2  # fullgraph=True held
    assert stats["cache"]["hit_map"] == eager_hits and "H" in eager_hits[0]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)  # dynamo's eager backend: same kernels


def test_compile_applied_before_the_cache_gives_the_same_result(pipe):
    """The compiled region sits below the cache's decisions whichever stage came first."""
    cache, compile_ = FBCacheConfig(residual_diff_threshold=0.3), CompileConfig(backend="eager")
    outputs, maps = [], []
    for order in ("cache first", "compile first"):
        torch._dynamo.reset()
        ctx = ApplyContext(pipe, pipe.device)
        handles = ([apply_fbcache(ctx, cache), apply_compile(ctx, compile_)] if order == "cache first"
                   else [apply_compile(ctx, compile_), apply_fbcache(ctx, cache)])
        try:
            outputs.append(generate(pipe))
            stats = {type(h).__name__: h.stats() for h in handles}
            maps.append(stats["BlockCache"]["hit_map"])
            assert stats["CompiledDenoiser"]["graph_breaks"] == 0
        finally:
            for handle in reversed(handles):
                handle.remove()
    assert maps[0] == maps[1] and torch.equal(outputs[0], outputs[1])


def test_remove_gives_back_the_eager_model_exactly(pipe, baseline):
    with accel.apply(pipe, {"cache": CACHES[0], "compile": COMPILE}):
        generate(pipe)
    assert all("forward" not in b.__dict__ for b in flux_blocks(pipe))
    assert torch.equal(generate(pipe), baseline)


def test_dynamic_shapes_cost_at_most_one_recompile_per_block_class_across_sizes(pipe):
    with accel.apply(pipe, {"compile": {**COMPILE, "dynamic": True}}) as run:
        generate(pipe, height=64, width=64)
        first = run.stats()["compile"]["graphs"]
        generate(pipe, height=32, width=48)
        generate(pipe, height=48, width=32)
        after = run.stats()["compile"]["graphs"]
    classes = len({type(b) for b in flux_blocks(pipe)})
    assert first >= classes  # something compiled: at least a graph per block class
    assert after - first <= classes


def test_graph_breaks_are_counted_where_fullgraph_lets_them_happen(pipe, monkeypatch):
    """A block whose computation breaks the graph: with fullgraph=false the report counts the breaks,
    with fullgraph=true compiling it fails instead of running slowly."""
    norm = flux_blocks(pipe)[0].norm1
    own = norm.forward

    def breaking(*args, **kwargs):
        torch._dynamo.graph_break()
        return own(*args, **kwargs)

    monkeypatch.setattr(norm, "forward", breaking)
    with accel.apply(pipe, {"compile": {**COMPILE, "fullgraph": False}}) as run:
        generate(pipe, num_inference_steps=1)
        assert run.stats()["compile"]["graph_breaks"] >= 1
    torch._dynamo.reset()
    with accel.apply(pipe, {"compile": COMPILE}):
        with pytest.raises(Exception, match="graph_break|Call to `torch._dynamo.graph_break"):
            generate(pipe, num_inference_steps=1)


def test_a_lora_loaded_after_compile_takes_effect_and_its_recompiles_are_counted():
    from peft import LoraConfig

    from tests.helpers import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    with accel.apply(pipe, {"compile": COMPILE}) as run:
        generate(pipe)
        before = run.stats()["compile"]["recompiles"]
        pipe.transformer.add_adapter(lora)
        compiled_lora = generate(pipe)
        cost = run.stats()["compile"]["recompiles"] - before
    eager_lora = generate(pipe)
    pipe.transformer.disable_adapters()
    plain = generate(pipe)
    assert not torch.allclose(eager_lora, plain, atol=1e-3)  # the LoRA changes the output...
    torch.testing.assert_close(compiled_lora, eager_lora, rtol=0, atol=1e-6)  # ...compiled as in eager
    assert cost >= 1  # the report says what the LoRA cost


@pytest.mark.parametrize("overrides, fragment", [
    (["compile.mode=reduce-overhead"], "mode='reduce-overhead' is not allowed on cpu"),
])
def test_the_doctor_refuses_what_cannot_work_here(overrides, fragment):
    from accel.doctor import diagnose

    problems = diagnose(accel.compose(None, ["model=flux_tiny", "compile=torch", *overrides]))
    assert any(fragment in p and p.startswith("compile.") for p in problems), problems


@pytest.mark.parametrize("overrides, fragment", [
    (["compile.backend=warp"], "compile.backend='warp' is not allowed"),
    (["compile.mode=max-autotune", "compile.options={max_autotune:true}"], "compile.options"),
    (["compile.scope=everything"], "compile.scope='everything'"),
    # declared by the strategies themselves (registry traits), checked once the recipe is whole
    (["compile.scope=full", "cache=fbcache"], "compile=torch cannot run with cache=fbcache: scope='full'"),
])
def test_bad_compile_settings_fail_at_compose(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        accel.compose(None, ["compile=torch", *overrides])


def test_full_scope_with_a_cache_is_refused_at_apply_too(pipe):
    with pytest.raises(AccelError, match="compile=torch cannot run with cache=fbcache: scope='full' compiles the whole"):
        accel.apply(pipe, {"cache": CACHES[0], "compile": {**COMPILE, "scope": "full"}})
    assert all("forward" not in b.__dict__ for b in flux_blocks(pipe))


def test_every_stage_together_with_inductor_and_remove_gives_the_baseline_back(pipe, baseline):
    """cache × compile(blocks, inductor) × quant(int8) × attention, as recipes/flux_fast composes them."""
    fast = accel.compose("flux_fast", ["model=flux_tiny"])
    off = fast.replace(cache={"residual_diff_threshold": 0.0})
    uncached = fast.replace(cache={"strategy": "none"})
    with accel.apply(pipe, uncached):
        reference = generate(pipe)
    with accel.apply(pipe, off) as run:
        out = generate(pipe)
        stats = run.stats()
    assert stats["compile"]["graph_breaks"] == 0 and stats["quant"]["layers_quantized"] > 0
    assert stats["cache"]["cached"] == 0
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)  # the cache's layer adds nothing at 0
    with accel.apply(pipe, fast.replace(cache={"residual_diff_threshold": 0.3})) as run:
        generate(pipe)
        assert run.stats()["cache"]["cached"] > 0
    assert torch.equal(generate(pipe), baseline)


def _save_lora(folder, rank: int, alpha: int, seed: int) -> str:
    """A FLUX LoRA of `rank` with random (non-zero) weights, saved as diffusers saves LoRAs (safetensors)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tests.helpers import tiny_pipeline

    transformer = tiny_pipeline().transformer
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v"],
                                       init_lora_weights=False))
    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   safe_serialization=True)
    return str(folder / "pytorch_lora_weights.safetensors")


def test_lora_hotswap_under_compile_swaps_ranks_and_scales_without_a_recompile(tmp_path):
    """compile.lora_hotswap_rank: the first LoRA loaded after compile adds layers (counted recompiles); a
    hot-swapped one of another rank and alpha then changes the output as in eager and costs none."""
    from tests.helpers import tiny_pipeline

    first = _save_lora(tmp_path / "a", rank=4, alpha=4, seed=1)
    second = _save_lora(tmp_path / "b", rank=8, alpha=16, seed=2)
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with accel.apply(pipe, {"compile": {**COMPILE, "lora_hotswap_rank": 8}}) as run:
        generate(pipe)
        pipe.load_lora_weights(first, adapter_name="style")
        with_first = generate(pipe)
        before = run.stats()["compile"]["recompiles"]
        pipe.load_lora_weights(second, adapter_name="style", hotswap=True)
        with_second = generate(pipe)
        swap_cost = run.stats()["compile"]["recompiles"] - before
    eager_second = generate(pipe)
    assert before >= 1  # the first LoRA's new layers: counted
    assert swap_cost == 0  # the hot swap: none
    assert not torch.allclose(with_first, with_second, atol=1e-3)  # the swap took effect...
    torch.testing.assert_close(with_second, eager_second, rtol=0, atol=1e-6)  # ...as in eager


def test_lora_hotswap_rank_is_checked():
    with pytest.raises(ConfigError, match="compile.lora_hotswap_rank=0 is not allowed"):
        accel.compose(None, ["compile=torch", "compile.lora_hotswap_rank=0"])
