"""A rule-based checker of images of the toy shape set: which shape, colour, size and grid cell the
main object has, and how often generated images get what their prompts asked for."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from skimage.measure import label

from accel.toy import shapes

ATTRIBUTES = ("shape", "colour", "size", "position")
# what counts as following the prompt; size is reported beside it
TASK = ("shape", "colour", "position")


def _as_float(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255
    return np.clip(image.astype(np.float64), 0, 1)


def object_mask(image: np.ndarray) -> np.ndarray:
    """The largest connected region of pixels far from the background (the border's median colour)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    distance = np.linalg.norm(image - np.median(border, axis=0), axis=-1)
    # half way to the object's own colour: anti-aliased edges count as far as they are covered
    far = distance > max(0.15, 0.5 * np.percentile(distance, 99.5))
    regions = label(far, connectivity=1)
    if regions.max() == 0:
        return far
    return regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1


def describe(image) -> Optional[shapes.Scene]:
    """The scene an RGB image (H, W, 3), uint8 or float in [0, 1], shows; None when it shows no object."""
    image = _as_float(image)
    mask = object_mask(image)
    if mask.sum() < 4:
        return None
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    box_h, box_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = mask.sum() / (box_h * box_w)  # square 1, circle pi/4, triangle 1/2
    middle = (rows.min() + rows.max()) / 2
    top_share = (rows < middle).mean() + (rows == middle).mean() / 2  # upward triangle 1/4, circle and square 1/2
    if fill < 0.6 or top_share < 0.4:
        shape = "triangle"
    else:
        shape = "square" if fill > 0.89 else "circle"
    mean = image[mask].mean(axis=0) * 255
    colour = min(shapes.COLOURS, key=lambda name: np.linalg.norm(mean - np.array(shapes.COLOURS[name])))
    side = max(box_h / height, box_w / width)
    size = "large" if side > (shapes.SIZES["small"] + shapes.SIZES["large"]) / 2 else "small"
    row = shapes.ROWS[min(2, int(3 * rows.mean() / height))]
    column = shapes.COLUMNS[min(2, int(3 * cols.mean() / width))]
    return shapes.Scene(shape, colour, size, row, column)


def _matches(found: Optional[shapes.Scene], wanted: shapes.Scene, attribute: str) -> bool:
    if found is None:
        return False
    if attribute == "position":
        return (found.row, found.column) == (wanted.row, wanted.column)
    return getattr(found, attribute) == getattr(wanted, attribute)


def scores(images: Sequence, prompts: Sequence[str]) -> dict[str, float]:
    """The fraction of images that show all of shape, colour and position their prompt asked for
    ("task"), and the fraction right for each attribute."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    wanted = [shapes.parse(p) for p in prompts]
    found = [describe(image) for image in images]
    result = {"task": float(np.mean([all(_matches(f, w, a) for a in TASK) for f, w in zip(found, wanted)]))}
    for attribute in ATTRIBUTES:
        result[attribute] = float(np.mean([_matches(f, w, attribute) for f, w in zip(found, wanted)]))
    return result


def accuracy(images: Sequence, prompts: Sequence[str]) -> float:
    """The fraction of images with the shape, colour and position their prompts ask for."""
    return scores(images, prompts)["task"]


def chance() -> float:
    """The task accuracy of a guess uniform over the options."""
    return 1 / (len(shapes.SHAPES) * len(shapes.COLOURS) * len(shapes.ROWS) * len(shapes.COLUMNS))
