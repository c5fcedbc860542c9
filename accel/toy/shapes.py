"""A procedural image set: one coloured shape on a plain background, and the prompt that describes it.

"a large red circle at the top left": a shape, a colour, a size and a cell of a 3x3 grid, each drawn
from a short list, so a rule-based checker can tell whether a generated image follows its prompt.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (240, 220, 50)}
BACKGROUND = (30, 30, 30)
SIZES = {"small": 0.18, "large": 0.28}  # side of the shape's bounding box, as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
SUPERSAMPLING = 4  # drawn larger, then downscaled: anti-aliased edges, as a decoder would make them
JITTER = 0.015  # random shift of the centre and change of the size, as a fraction of the image side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    row: str
    column: str

    @property
    def position(self) -> str:
        if self.row == "middle":
            return self.column if self.column != "center" else "center"
        return self.row if self.column == "center" else f"{self.row} {self.column}"

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


ALL_SCENES = tuple(Scene(*values) for values in itertools.product(SHAPES, COLOURS, SIZES, ROWS, COLUMNS))
_BY_PROMPT = {scene.prompt: scene for scene in ALL_SCENES}


def parse(prompt: str) -> Scene:
    """The scene a prompt of this set describes; KeyError for any other text."""
    return _BY_PROMPT[prompt.strip()]


def sample_scenes(count: int, rng: np.random.Generator, scenes=ALL_SCENES) -> list[Scene]:
    return [scenes[i] for i in rng.integers(len(scenes), size=count)]


def render(scene: Scene, resolution: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as an RGB uint8 array (resolution, resolution, 3); `rng` jitters place and size."""
    jitter = rng.uniform(-JITTER, JITTER, size=3) if rng is not None else np.zeros(3)
    big = resolution * SUPERSAMPLING
    side = (SIZES[scene.size] + jitter[2]) * big
    cx = (COLUMNS.index(scene.column) + 0.5) / 3 * big + jitter[0] * big
    cy = (ROWS.index(scene.row) + 0.5) / 3 * big + jitter[1] * big
    left, top, right, bottom = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    else:  # pointing up, base at the bottom of the box
        draw.polygon(((cx, top), (right, bottom), (left, bottom)), fill=colour)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def dataset(count: int, seed: int = 0, resolution: int = 64, scenes=ALL_SCENES) -> tuple[np.ndarray, list[str]]:
    """`count` images (count, resolution, resolution, 3) uint8 and their prompts; the same for the same seed."""
    rng = np.random.default_rng(seed)
    chosen = sample_scenes(count, rng, scenes)
    images = np.stack([render(scene, resolution, rng) for scene in chosen])
    return images, [scene.prompt for scene in chosen]
