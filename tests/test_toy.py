"""The toy shape task: its images, the checker, and the trained flux_toy pipeline shipped in the package."""
import numpy as np
import pytest
import torch

import accel
from accel.errors import ConfigError
from accel.toy import checker, shapes


def test_the_checker_reads_rendered_ground_truth():
    images, prompts = shapes.dataset(300, seed=11)
    result = checker.scores(images, prompts)
    assert result["task"] >= 0.99 and result["colour"] == 1.0 and result["position"] == 1.0
    assert checker.accuracy(images / 255.0, prompts) == result["task"]  # floats in [0, 1] read as uint8 do


def test_the_checker_sees_a_wrong_image_as_wrong():
    images, prompts = shapes.dataset(20, seed=2)
    assert checker.accuracy(images, prompts[1:] + prompts[:1]) < 0.3
    assert checker.describe(np.full((64, 64, 3), 30, np.uint8)) is None  # background only


@pytest.mark.parametrize("attribute, options", [("row", shapes.ROWS), ("column", shapes.COLUMNS),
                                                ("shape", shapes.SHAPES), ("colour", tuple(shapes.COLOURS))])
def test_one_wrong_attribute_makes_an_image_wrong(attribute, options):
    import dataclasses

    images, prompts = shapes.dataset(20, seed=4)
    wrong = []
    for prompt in prompts:
        scene = shapes.parse(prompt)
        other = next(o for o in options if o != getattr(scene, attribute))
        wrong.append(dataclasses.replace(scene, **{attribute: other}).prompt)
    assert checker.accuracy(images, wrong) == 0.0


def test_the_dataset_is_deterministic_from_its_seed():
    first, prompts = shapes.dataset(16, seed=5)
    again, prompts_again = shapes.dataset(16, seed=5)
    other, _ = shapes.dataset(16, seed=6)
    assert prompts == prompts_again and np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (16, 64, 64, 3) and first.dtype == np.uint8


def test_prompts_parse_back_to_their_scenes():
    assert len({s.prompt for s in shapes.ALL_SCENES}) == len(shapes.ALL_SCENES)
    scene = shapes.parse("a large red circle at the top left")
    assert (scene.shape, scene.colour, scene.size, scene.row, scene.column) == ("circle", "red", "large", "top", "left")
    assert shapes.parse("a small blue square at the center").row == "middle"


def test_a_packaged_pipeline_must_be_shipped():
    with pytest.raises(ConfigError, match="flux_toy"):
        accel.compose(None, ["model=flux_toy", "model.pretrained=nothing_here"])


def test_flux_toy_loads_and_follows_its_prompts():
    cfg = accel.compose(None, ["model=flux_toy"])
    assert (cfg.model.source, cfg.model.height) == ("packaged", 64)
    pipe = accel.load_pipeline(cfg.model, device="cpu")
    prompts = ["a large red circle at the top left", "a large blue square at the bottom right",
               "a large yellow triangle at the center", "a large green circle at the top right"]
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompt=prompts, num_inference_steps=8, height=64, width=64, generator=generators,
                  output_type="np").images
    # chance is about 1 in 100; a random-weight pipeline draws no shape at all
    assert checker.accuracy(images, prompts) >= 0.5
