"""Every shipped recipe runs on the embedded tiny model of its architecture, as shipped, and its cache
caches at some threshold: a recipe that only works on weights a user may not have is a broken recipe."""
import functools

import pytest
from omegaconf import OmegaConf

import accel
from accel import resources
from tests.helpers import generate, tiny_pipeline

RECIPES = sorted(p.stem for p in resources.recipes_dir().glob("*.yaml"))
ALWAYS = 1e9


@functools.lru_cache(maxsize=None)
def tiny_model_of(architecture: str) -> str:
    """The embedded tiny model of an architecture (the plainest one, where there are several)."""
    names = [p.stem for p in (resources.conf_dir() / "model").glob("*.yaml")
             if OmegaConf.load(p).get("source") == "tiny" and OmegaConf.load(p).architecture == architecture]
    return min(names, key=len)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_on_its_tiny_model_and_caches(recipe, monkeypatch):
    model = tiny_model_of(accel.compose(recipe).model.architecture)
    cfg = accel.compose(recipe, [f"model={model}"])
    if cfg.attention.strategy == "accel_triton":  # no GPU here: our Triton kernel runs in Triton's interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pipe = accel.load_pipeline(cfg.model, device="cpu") if cfg.model.dtype != "float32" else tiny_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=6, height=cfg.model.height, width=cfg.model.width)
    if cfg.model.num_frames:
        call["num_frames"] = cfg.model.num_frames
    with accel.apply(pipe, cfg) as run:
        generate(pipe, **call)
        stats = run.stats()
    if cfg.cache.strategy == "none":
        return
    assert stats["cache"]["steps"] == 6
    threshold = stats["cache"]["threshold"]["name"]
    with accel.apply(pipe, cfg.replace(cache={threshold: ALWAYS})) as run:
        generate(pipe, **call)
        assert run.stats()["cache"]["cached"] >= 1
