"""Quality of an accelerated output against the baseline of the same seed.

Outputs are decoded pixels in [0, 1] as the job produces them: images (N, H, W, C) or video
(N, F, H, W, C). `metrics(names, output, reference, ...)` computes the named ones; a metric that does
not apply (video figures on images, task accuracy without toy prompts, LPIPS without its weights
here) is None, with the reason under "unavailable". With names=None, every metric that applies to
these inputs: those that do not fit them are left out, those that fit but cannot run here (LPIPS
without its weights) stay, as None with the reason.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from accel.errors import ConfigError


class Unavailable(Exception):
    """A metric that cannot be computed here, and why."""


class NotApplicable(Unavailable):
    """A metric that does not fit these inputs (a video figure on images), and why."""


def _pair(output, reference) -> tuple[np.ndarray, np.ndarray]:
    output, reference = np.asarray(output, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if output.shape != reference.shape:
        raise ValueError(f"output {output.shape} and reference {reference.shape} differ in shape")
    return output, reference


def psnr(output, reference) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1], over all of them; inf when identical."""
    output, reference = _pair(output, reference)
    mse = float(np.mean((output - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _frames(array: np.ndarray) -> np.ndarray:
    """Images (N, H, W, C) or video (N, F, H, W, C) as a stack of frames (M, H, W, C)."""
    return array.reshape(-1, *array.shape[-3:])


def ssim(output, reference) -> float:
    """Mean structural similarity (scikit-image's, per image or frame, colour channels last)."""
    from skimage.metrics import structural_similarity

    output, reference = _pair(output, reference)
    height, width = output.shape[-3:-1]
    window = min(7, height - (1 - height % 2), width - (1 - width % 2))  # odd, at most the smaller side
    return float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=1.0, win_size=window)
                          for a, b in zip(_frames(output), _frames(reference))]))


def mean_abs(output, reference) -> float:
    output, reference = _pair(output, reference)
    return float(np.mean(np.abs(output - reference)))


def max_abs(output, reference) -> float:
    output, reference = _pair(output, reference)
    return float(np.max(np.abs(output - reference)))


def relative_l2(output, reference) -> float:
    """||output - reference|| / ||reference||: for latents, which have no fixed range."""
    output, reference = _pair(output, reference)
    norm = float(np.linalg.norm(reference))
    difference = float(np.linalg.norm(output - reference))
    return 0.0 if difference == 0 else (math.inf if norm == 0 else difference / norm)


def _video(output, reference) -> tuple[np.ndarray, np.ndarray]:
    output, reference = _pair(output, reference)
    if output.ndim != 5:
        raise NotApplicable(f"a video figure, and the output is not video (N, F, H, W, C) but {output.shape}")
    return output, reference


def frame_psnr(output, reference) -> list[float]:
    """PSNR of each frame index, over the batch."""
    output, reference = _video(output, reference)
    return [psnr(output[:, f], reference[:, f]) for f in range(output.shape[1])]


def flicker(output, reference) -> float:
    """Mean absolute difference between the output's frame-to-frame changes and the baseline's:
    0 when the output changes over time as the baseline does (even if every frame is off by the
    same amount), larger when frames jump where the baseline's do not."""
    output, reference = _video(output, reference)
    return mean_abs(np.diff(output, axis=1), np.diff(reference, axis=1))


def task_accuracy(output, prompts: Optional[Sequence[str]]) -> float:
    """The toy shape task's accuracy of the output images (model=flux_toy): the fraction that show the
    shape, colour and position their prompt asks for, by `accel.toy.checker`."""
    from accel.toy import checker, shapes  # scikit-image's regions: loaded when a toy task is scored

    output = np.asarray(output)
    if output.ndim != 4:
        raise NotApplicable(f"the toy task is scored on images (N, H, W, C), not {output.shape}")
    if prompts is None:
        raise NotApplicable("no prompts given")
    prompts = [prompts] * len(output) if isinstance(prompts, str) else list(prompts)
    unknown = [p for p in prompts if p.strip() not in {s.prompt for s in shapes.ALL_SCENES}]
    if unknown:
        raise NotApplicable(f"{unknown[0]!r} is not a prompt of the toy shape set (e.g. {shapes.ALL_SCENES[0].prompt!r})")
    return checker.accuracy(output, prompts)


def _lpips_weights() -> Optional[str]:
    """Why LPIPS cannot run here without downloading, or None when it can."""
    for package in ("lpips", "torchvision"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed"
    import torch

    backbone = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not backbone.exists():
        return f"its AlexNet backbone weights are not at {backbone} (accel never downloads them)"
    return None


def lpips(output, reference) -> float:
    """Mean LPIPS (AlexNet) distance, when the lpips package and its backbone weights are here."""
    reason = _lpips_weights()
    if reason is not None:
        raise Unavailable(reason)
    import lpips as lpips_package
    import torch

    output, reference = _pair(output, reference)
    model = lpips_package.LPIPS(net="alex", verbose=False).eval()
    as_tensor = lambda a: torch.from_numpy(_frames(a)).permute(0, 3, 1, 2).float() * 2 - 1  # noqa: E731
    with torch.no_grad():
        return float(model(as_tensor(output), as_tensor(reference)).mean())


@dataclass(frozen=True)
class Inputs:
    output: Any
    reference: Any
    prompts: Optional[Sequence[str]] = None
    latents: Any = None
    reference_latents: Any = None

    def latent_pair(self):
        if self.latents is None or self.reference_latents is None:
            raise NotApplicable("no latents given")
        return self.latents, self.reference_latents


METRICS: dict[str, Callable[[Inputs], Any]] = {
    "psnr": lambda i: psnr(i.output, i.reference),
    "ssim": lambda i: ssim(i.output, i.reference),
    "mean_abs": lambda i: mean_abs(i.output, i.reference),
    "max_abs": lambda i: max_abs(i.output, i.reference),
    "frame_psnr": lambda i: frame_psnr(i.output, i.reference),
    "flicker": lambda i: flicker(i.output, i.reference),
    "task_accuracy": lambda i: task_accuracy(i.output, i.prompts),
    "lpips": lambda i: lpips(i.output, i.reference),
    "latent_mean_abs": lambda i: mean_abs(*i.latent_pair()),
    "latent_max_abs": lambda i: max_abs(*i.latent_pair()),
    "latent_relative_l2": lambda i: relative_l2(*i.latent_pair()),
}


def check_names(names: Optional[Sequence[str]], field: str = "metrics") -> None:
    """Raise ConfigError for a name that is not a metric, naming the field and the known ones."""
    if names is None:
        return
    if isinstance(names, str):
        raise ConfigError(f"{field}={names!r} must be a list of metric names, e.g. [psnr, ssim], or null for "
                          "every metric that applies")
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"{field}: {name!r} is not a metric; the metrics are {', '.join(METRICS)} "
                              "(or null for every one that applies)")


def metrics(names: Optional[Sequence[str]], output, reference, prompts: Optional[Sequence[str]] = None,
            latents=None, reference_latents=None) -> dict[str, Any]:
    """The named metrics of `output` against `reference` (names=None: every one that applies); those
    that cannot be computed are None, with the reason in result["unavailable"][name]. An unknown name
    raises ConfigError listing the known ones."""
    if isinstance(names, str):
        names = [names]
    check_names(names)
    inputs = Inputs(output, reference, prompts, latents, reference_latents)
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in names if names is not None else METRICS:
        try:
            results[name] = METRICS[name](inputs)
        except NotApplicable as why:
            if names is not None:
                results[name], unavailable[name] = None, str(why)
        except Unavailable as why:
            results[name], unavailable[name] = None, str(why)
    if unavailable:
        results["unavailable"] = unavailable
    return results
