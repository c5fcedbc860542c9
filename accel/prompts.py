"""The prompt sets that calibration and tuning measure on: prompts of the kind a model is used with."""
from __future__ import annotations

from typing import Optional

from accel.errors import require
from accel.toy.shapes import Scene

PHOTO = (
    "a red fox in fresh snow, golden hour",
    "a lighthouse on a cliff at night, stormy sea",
    "a bowl of ramen on a wooden table, studio light",
    "portrait of an old sailor, deep wrinkles, film grain",
)


def toy_prompts() -> tuple[str, ...]:
    """Six prompts of the toy shapes task (model=flux_toy), spread over shapes, colours, sizes and places."""
    return tuple(Scene(*words).prompt for words in (
        ("circle", "red", "small", "top", "left"), ("square", "green", "large", "middle", "center"),
        ("triangle", "blue", "small", "bottom", "right"), ("circle", "yellow", "large", "middle", "right"),
        ("triangle", "red", "large", "top", "center"), ("square", "blue", "small", "bottom", "left")))


PROMPT_SETS = {"photo": lambda: PHOTO, "toy": toy_prompts}
PACKAGED_PROMPTS = {"flux_toy": "toy"}  # packaged pipeline -> the prompt set it was trained on


def prompt_set(name: str, model: Optional[object]) -> tuple[str, tuple[str, ...]]:
    """The prompt set `name` (auto, or one of PROMPT_SETS) resolves to for `model` (a ModelConfig):
    (set name, prompts)."""
    allowed = ("auto", *PROMPT_SETS)
    require(name in allowed, "prompts", name,
            f"one of {', '.join(allowed)} (auto: the packaged model's own prompt set if it has one, else photo)")
    if name == "auto":
        packaged = getattr(model, "source", None) == "packaged"
        name = PACKAGED_PROMPTS.get(getattr(model, "pretrained", None), "photo") if packaged else "photo"
    return name, PROMPT_SETS[name]()
