"""accel.calibrate picks prompts the model was made for: the toy shapes for the packaged flux_toy."""
from __future__ import annotations

import os
import subprocess
import sys

from types import SimpleNamespace as Model

import pytest

from accel.calibrate import _take_prompts_argument
from accel.errors import ConfigError
from accel.prompts import PHOTO as PROMPTS
from accel.prompts import prompt_set, toy_prompts
from accel.toy import shapes

TOY_MODEL = Model(architecture="flux", source="packaged", pretrained="flux_toy")


def run_calibrate(*args, cwd):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "accel.calibrate", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_auto_takes_the_toy_prompts_for_flux_toy_and_photo_prompts_elsewhere():
    name, prompts = prompt_set("auto", TOY_MODEL)
    assert name == "toy" and prompts == toy_prompts() and len(set(prompts)) == len(prompts) >= 4
    assert all(shapes.parse(p) for p in prompts)  # every one a prompt of the toy set
    assert prompt_set("auto", Model(architecture="flux", source="tiny")) == ("photo", PROMPTS)
    assert prompt_set("auto", Model(source="pretrained", pretrained="flux_toy")) == ("photo", PROMPTS)
    assert prompt_set("photo", TOY_MODEL) == ("photo", PROMPTS)
    assert prompt_set("toy", Model(source="tiny")) == ("toy", toy_prompts())


def test_the_prompts_argument_is_taken_off_the_command_line():
    argv = ["calibrate", "model=flux_toy", "prompts=photo", "steps=6"]
    assert _take_prompts_argument(argv) == "photo" and argv == ["calibrate", "model=flux_toy", "steps=6"]
    assert _take_prompts_argument(argv) == "auto" and len(argv) == 3
    with pytest.raises(ConfigError, match=r"prompts='fox' is not allowed: one of auto, photo, toy"):
        _take_prompts_argument(["calibrate", "prompts=fox"])
    with pytest.raises(ConfigError, match="prompts= is given 2 times"):
        _take_prompts_argument(["calibrate", "prompts=toy", "prompts=photo"])


def test_calibrating_flux_toy_uses_its_prompts(tmp_path):
    run_dir = tmp_path / "cal"
    result = run_calibrate("model=flux_toy", "steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"calibrating on {len(toy_prompts())} toy prompts" in result.stdout
    option = (run_dir / "conf" / "cache" / "teacache_calibrated.yaml").read_text()
    assert f"model=flux_toy, 6 steps, {len(toy_prompts())} toy prompts, {len(toy_prompts()) * 5} pairs" in option
    # the threshold is the fit's own: 1.5 x the median rescaled step of the calibration runs
    import numpy as np
    import yaml

    fitted = yaml.safe_load(option)
    pairs = np.loadtxt(run_dir / "calibration_pairs.csv", delimiter=",")
    rescaled = np.abs(np.poly1d(fitted["coefficients"])(pairs[:, 0]))
    assert fitted["rel_l1_threshold"] == pytest.approx(1.5 * np.median(rescaled), rel=1e-3)


def test_a_wrong_prompt_set_is_one_line_and_exit_2(tmp_path):
    result = run_calibrate("model=flux_toy", "prompts=fox", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prompts='fox' is not allowed: one of auto, photo, toy" in result.stderr
    assert not (tmp_path / "outputs").exists()
