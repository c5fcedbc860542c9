"""The guarantee matrix, generated from the registered families (accel.families): every family and
every pipeline variant it covers gets every test here without a line written for it.

Per family, on its embedded tiny pipeline: threshold 0 is bit-exact and remove() restores; no state
survives a generation (same shape, or another resolution, batch or step count); wrapped blocks keep
their signature; CFG branches stay apart; every cache kind hits at a caching threshold and skips
exactly its span; compiled blocks trace whole under every cache with the eager hit map; the doctor's
size rule; LoRAs loaded before or after; stochastic schedulers. Per variant (img2img, inpaint, edit,
fill, ...): threshold 0 bit-exact, a caching threshold hits, remove() restores."""
import inspect

import pytest
import torch

import accel
from accel.context import ApplyContext
from accel.doctor import diagnose
from accel.families import FAMILIES, for_pipeline
from accel.strategies.fbcache import FBCacheConfig, apply_fbcache
from tests.helpers import IDENTITY, generate, tiny_option

NAMES = sorted(FAMILIES)
VARIANTS = [(name, v.pipeline_class) for name in NAMES for v in FAMILIES[name].variants]
ALWAYS = 1e9
STEPS = 4
OFF = {"cache": {"strategy": "fbcache", "residual_diff_threshold": 0.0}}
CACHING = {"cache": {"strategy": "fbcache", "residual_diff_threshold": ALWAYS, "max_consecutive_hits": 1}}
EAGER_COMPILE = {"strategy": "torch", "backend": "eager"}


def tiny(name: str):
    pipe = accel.load_pipeline(tiny_option(name), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return request.param, tiny(request.param)


def run(name: str, pipe, **kwargs):
    return generate(pipe, **{**FAMILIES[name].tiny_call, "num_inference_steps": STEPS, **kwargs})


def cache_kinds(name: str, pipe) -> dict[str, dict]:
    """Every cache kind that applies to the family, at a threshold every probe passes."""
    adapter = FAMILIES[name].adapter
    kinds = {"fbcache": {"strategy": "fbcache", "residual_diff_threshold": ALWAYS}}
    if adapter.residual_base == "probe":  # a UNet's span must reach its last block
        last = 1 if len(adapter.blocks(adapter.denoiser(pipe))) >= 3 else 0
        kinds["mbcache"] = {"strategy": "mbcache", "residual_diff_threshold": ALWAYS, "first_blocks": 1,
                            "last_blocks": last}
    if adapter.modulated_input is not None:
        kinds["teacache"] = {"strategy": "teacache", "rel_l1_threshold": ALWAYS, "coefficients": IDENTITY}
    return kinds


def test_off_equals_baseline_and_remove_restores(model):
    name, pipe = model
    baseline = run(name, pipe)
    with accel.apply(pipe, OFF) as applied:
        assert torch.equal(run(name, pipe), baseline)
        assert applied.stats()["cache"]["cached"] == 0
    with accel.apply(pipe, CACHING) as applied:
        assert not torch.equal(run(name, pipe), baseline)
        assert applied.stats()["cache"]["cached"] > 0
    assert torch.equal(run(name, pipe), baseline)


def test_no_state_survives_between_generations_of_the_same_shape(model):
    """Same-shape calls pass every shape check, so only fresh state per call keeps them apart."""
    name, pipe = model
    calls = [dict(prompt="a red fox", seed=1), dict(prompt="a lighthouse at night", seed=1),
             dict(prompt="a red fox", seed=2)]
    with accel.apply(pipe, CACHING):
        together = [run(name, pipe, **c) for c in calls]
    for call, out in zip(calls, together):
        with accel.apply(pipe, CACHING):
            assert torch.equal(run(name, pipe, **call), out)


def test_no_state_survives_a_change_of_resolution_batch_or_steps(model):
    name, pipe = model
    size, adapter = FAMILIES[name].tiny_call, for_pipeline(pipe)
    step = adapter.size_rule({"vae": dict(pipe.vae.config), "denoiser": dict(adapter.denoiser(pipe).config)}).spatial
    batch = "num_videos_per_prompt" if "num_frames" in size else "num_images_per_prompt"
    calls = [dict(seed=1), dict(seed=2, height=size["height"] + step, width=size["width"] - step, num_inference_steps=5),
             {"seed": 1, batch: 2, "num_inference_steps": 6}]
    with accel.apply(pipe, CACHING):
        together = [run(name, pipe, **c) for c in calls]
    for call, out in zip(calls, together):
        with accel.apply(pipe, CACHING):
            assert torch.equal(run(name, pipe, **call), out)


def test_wrapped_blocks_keep_their_signature_so_a_later_binding_finds_positional_args(model):
    """A second cache (or a calibration) binds blocks another cache already wrapped and reads their
    arguments by the forward's signature; Wan's blocks, for one, take theirs by position."""
    name, pipe = model
    adapter = for_pipeline(pipe)
    signatures = [inspect.signature(b.module.forward) for b in adapter.blocks(adapter.denoiser(pipe))]
    with accel.apply(pipe, OFF):
        for block, signature in zip(adapter.blocks(adapter.denoiser(pipe)), signatures):
            assert "forward" in block.module.__dict__  # bound over the layers
            assert inspect.signature(block.module.forward) == signature
            names = list(signature.parameters)
            args = tuple(object() for _ in names)  # every argument passed by position
            hidden, encoder = block.inputs(args, {})
            assert hidden is args[names.index(block.io.hidden_arg)]
            if block.io.encoder_out is not None:
                assert encoder is args[names.index(block.io.encoder_arg)]


def test_a_second_cache_over_wrapped_blocks_runs_exactly(model):
    name, pipe = model
    baseline = run(name, pipe)
    ctx = ApplyContext(pipe, pipe.device)
    first = apply_fbcache(ctx, FBCacheConfig(residual_diff_threshold=0.0))
    try:
        second = apply_fbcache(ctx, FBCacheConfig(residual_diff_threshold=0.0))
        try:
            assert torch.equal(run(name, pipe), baseline)
            assert second.stats()["computed"] > 0 and second.stats()["cached"] == 0
        finally:
            second.remove()
    finally:
        first.remove()
    assert torch.equal(run(name, pipe), baseline)


def _record_span(pipe, adapter):
    """Per denoiser call: the (hidden, encoder) streams a residual is measured from, and those leaving
    the last block (encoder None where a block does not return it)."""
    blocks = adapter.blocks(adapter.denoiser(pipe))
    first, last, base, end = blocks[0], blocks[-1], [], []

    def clone(streams):
        return tuple(None if s is None else s.clone() for s in streams)

    def before_first(module, args, kwargs):
        if adapter.residual_base == "span_input":
            base.append(clone(first.inputs(args, kwargs)))

    def after_first(module, args, kwargs, output):
        if adapter.residual_base == "probe":
            base.append(clone(first.io.outputs(output)))

    def after_last(module, args, output):
        end.append(clone(last.io.outputs(output)))

    handles = [first.module.register_forward_pre_hook(before_first, with_kwargs=True),
               first.module.register_forward_hook(after_first, with_kwargs=True),
               last.module.register_forward_hook(after_last)]
    return base, end, handles


def test_cfg_branches_never_mix(model):
    """With hits on odd steps, each branch's (or batch half's) hit must equal its own base plus its own
    residual from the step before; mixed branches would add the other branch's residual."""
    name, pipe = model
    family = FAMILIES[name]
    adapter = family.adapter
    call = dict(family.cfg_call)
    base, end, handles = _record_span(pipe, adapter)
    try:
        run(name, pipe, **call)
        reference_base, reference_end = list(base), list(end)
        base.clear(), end.clear()
        with accel.apply(pipe, CACHING) as applied:
            run(name, pipe, **call)
            hit_map = applied.stats()["cache"]["hit_map"]
    finally:
        for h in handles:
            h.remove()
    branches = len(hit_map)
    assert branches == (1 if adapter.batched_cfg else 2) and all(m == "CHCH" for m in hit_map)
    for branch in range(branches):
        full, hit = branch, branches + branch  # step 0 and step 1 of this branch
        for stream in (0, 1):  # hidden, and encoder where the last block returns it
            if end[hit][stream] is None:
                continue
            expected = reference_base[hit][stream] + (reference_end[full][stream] - reference_base[full][stream])
            torch.testing.assert_close(end[hit][stream], expected, rtol=0, atol=1e-5)


def _computation_counter(blocks):
    """Counts each block's own computation: a hook on the last layer with weights inside it, which a
    skipped block never reaches (and a probe, which may call a block's first norm, does not call)."""
    counts = [0] * len(blocks)
    handles = []
    for index, block in enumerate(blocks):
        inner = [m for m in block.module.modules() if m is not block.module and m._parameters][-1]

        def hook(module, args, output, index=index):
            counts[index] += 1

        handles.append(inner.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("kind", ["fbcache", "mbcache", "teacache"])
def test_every_cache_kind_hits_and_skips_exactly_its_span(model, kind):
    name, pipe = model
    kinds = cache_kinds(name, pipe)
    if kind not in kinds:
        pytest.skip(f"{kind} does not apply to {name} (its doctor says why: tests/test_cache_kinds.py)")
    adapter = for_pipeline(pipe)
    blocks = adapter.blocks(adapter.denoiser(pipe))
    counts, handles = _computation_counter(blocks)
    try:
        with accel.apply(pipe, {"cache": {**kinds[kind], "max_consecutive_hits": 1}}) as applied:
            run(name, pipe)
            stats = applied.stats()["cache"]
    finally:
        for handle in handles:
            handle.remove()
    assert stats["cached"] >= 1 and stats["computed"] + stats["cached"] == stats["calls"]
    last = kinds[kind].get("last_blocks", 0)
    always = {"fbcache": {0}, "mbcache": {0, *range(len(blocks) - last, len(blocks))}, "teacache": set()}[kind]
    for index, count in enumerate(counts):
        expected = stats["calls"] if index in always else stats["computed"]
        assert count == expected, (kind, index, counts, stats["hit_map"])


@pytest.mark.parametrize("kind", ["fbcache", "mbcache", "teacache"])
def test_blocks_compile_whole_under_every_cache_with_the_eager_hit_map(model, kind):
    name, pipe = model
    kinds = cache_kinds(name, pipe)
    if kind not in kinds:
        pytest.skip(f"{kind} does not apply to {name}")
    cache = {**kinds[kind], "max_consecutive_hits": 1}
    torch._dynamo.reset()
    try:
        with accel.apply(pipe, {"cache": cache}) as applied:
            eager = run(name, pipe)
            eager_hits = applied.stats()["cache"]["hit_map"]
        with accel.apply(pipe, {"cache": cache, "compile": EAGER_COMPILE}) as applied:
            compiled = run(name, pipe)
            stats = applied.stats()
    finally:
        torch._dynamo.reset()
    assert stats["compile"]["graph_breaks"] == 0 and stats["compile"]["graphs"] >= 1  # fullgraph=True held
    assert stats["cache"]["hit_map"] == eager_hits and "H" in eager_hits[0]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_the_doctor_refuses_a_size_the_family_does_not_make_and_takes_one_it_does(name):
    option = tiny_option(name)
    size = FAMILIES[name].tiny_call
    recipe = accel.compose(None, [f"model={option}", f"height={size['height']}", f"width={size['width']}"])
    assert not [p for p in diagnose(recipe) if "height" in p or "width" in p]
    off = accel.compose(None, [f"model={option}", f"height={size['height'] + 1}"])
    assert any(p.startswith(f"height={size['height'] + 1} is not allowed: a multiple of") for p in diagnose(off))


@pytest.mark.parametrize("lora_first", [True, False])
def test_a_lora_loaded_before_or_after_the_cache_takes_effect(model, lora_first):
    from peft import LoraConfig

    name, _ = model
    pipe = tiny(name)  # a pipeline of its own: the LoRA stays in it
    denoiser = for_pipeline(pipe).denoiser(pipe)
    baseline = run(name, pipe)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    if lora_first:
        denoiser.add_adapter(lora)
        with_lora = run(name, pipe)
        applied = accel.apply(pipe, OFF)
    else:
        applied = accel.apply(pipe, OFF)
        denoiser.add_adapter(lora)
        with_lora = None
    cached = run(name, pipe)
    applied.remove()
    plain_lora = run(name, pipe)
    assert not torch.equal(plain_lora, baseline)  # the LoRA changes the output...
    assert torch.equal(cached, plain_lora)  # ...under the cache as without it
    if with_lora is not None:
        assert torch.equal(with_lora, plain_lora)


def test_stochastic_schedulers_still_work(model):
    name, pipe = model
    from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    original = pipe.scheduler
    if isinstance(original, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, stochastic_sampling=True)
    else:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)

    def noisy_generate():
        torch.manual_seed(0)  # some schedulers draw their step noise from the global generator
        return run(name, pipe)

    try:
        baseline = noisy_generate()
        with accel.apply(pipe, OFF):
            assert torch.equal(noisy_generate(), baseline)
        with accel.apply(pipe, CACHING) as applied:
            out = noisy_generate()
            assert applied.stats()["cache"]["cached"] > 0
        assert torch.isfinite(out).all()
    finally:
        pipe.scheduler = original


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def variant(request):
    name, pipeline_class = request.param
    family = FAMILIES[name]
    chosen = next(v for v in family.variants if v.pipeline_class == pipeline_class)
    pipe = family.variant(tiny(name), chosen)
    pipe.set_progress_bar_config(disable=True)
    return name, pipe, chosen.inputs(pipe, family.tiny_call)


def test_a_variant_pipeline_is_cached_exactly_as_its_family(variant):
    """diffusers' own cache hooks stay silently inactive on img2img, inpaint, edit and i2v pipelines:
    here each variant is matched, hits, is bit-exact at threshold 0, and comes off whole."""
    name, pipe, inputs = variant
    assert for_pipeline(pipe) is FAMILIES[name].adapter
    baseline = run(name, pipe, **inputs)
    with accel.apply(pipe, OFF) as applied:
        assert torch.equal(run(name, pipe, **inputs), baseline)
        assert applied.stats()["cache"]["cached"] == 0
    with accel.apply(pipe, CACHING) as applied:
        out = run(name, pipe, **inputs)
        stats = applied.stats()["cache"]
    assert stats["cached"] > 0 and stats["computed"] > 0 and torch.isfinite(out).all()
    assert not torch.equal(out, baseline)
    assert torch.equal(run(name, pipe, **inputs), baseline)
