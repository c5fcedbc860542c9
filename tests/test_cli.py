"""`python -m accel` end to end, as a user runs it: run folders, reports, sweeps, and clean errors."""
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import accel

pytestmark = pytest.mark.slow
FAST = ["model=flux_tiny", "steps=4", "warmup=0"]


def run_accel(*args, cwd, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "accel", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_main_job_saves_images_report_and_replayable_recipe(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fbcache", *FAST, "compare=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "hit map" in result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"]["cache"]["strategy"] == "fbcache"
    assert set(report["timings"]) >= {"load_s", "apply_s", "first_call_s", "accelerated"}
    assert report["timings"]["accelerated"]["per_step_s"] > 0
    assert report["stats"]["cache"]["steps"] == 4 and len(report["stats"]["cache"]["hit_map"][0]) == 4
    assert {"speedup", "quality"} <= set(report["baseline"])
    assert report["environment"]["torch"] and report["environment"]["device"] == "cpu"
    assert (run_dir / "image_00.png").exists() and (run_dir / "baseline_00.png").exists()

    monkeypatch.setenv("ACCEL_RECIPES", str(run_dir))
    assert accel.compose("recipe") == OmegaConf.create(report["recipe"])


def test_a_second_run_into_the_same_folder_overwrites_nothing(tmp_path):
    run_dir = tmp_path / "run"
    for _ in range(2):
        result = run_accel("recipe=flux_fbcache", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert (run_dir / "image_00.png").exists() and (run_dir / "image_00.1.png").exists()


def test_default_run_folders_are_unique(tmp_path):
    for _ in range(2):
        assert run_accel("recipe=flux_fbcache", *FAST, cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "outputs").glob("*/*/report.json"))) == 2


def test_cfg_job_prints_the_composed_recipe(tmp_path):
    result = run_accel("recipe=flux_fbcache", "model=flux_tiny", "cache.residual_diff_threshold=0.05", "--cfg", "job",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.cache.residual_diff_threshold == 0.05 and cfg.model.architecture == "flux"


def test_multirun_sweeps_thresholds(tmp_path):
    result = run_accel("-m", "recipe=flux_fbcache", *FAST, "cache.residual_diff_threshold=0,1e9",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reports = [json.loads((tmp_path / "sweep" / str(i) / "report.json").read_text()) for i in (0, 1)]
    assert [r["stats"]["cache"]["cached"] for r in reports] == [0, 3]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["recipe=no_such_recipe"], "Could not find 'recipe/no_such_recipe'"),
        (["recipe=flux_fbcache", "cache=warp"], "Could not find 'cache/warp'"),
        (["recipe=flux_fbcache", "cache.bogus=1"], "bogus"),
        (["recipe=flux_fbcache", "cache.residual_diff_threshold=fast"], "fast"),
        (["recipe=flux_fbcache", "model=flux_tiny", "cache.residual_diff_threshold=-1"],
         "cache.residual_diff_threshold=-1.0 is not allowed"),
        (["recipe=flux_fbcache", "model=flux_tiny", "cache.start=0.9", "cache.end=0.1"], "cache.start=0.9"),
        (["recipe=flux_fbcache"], "black-forest-labs/FLUX.1-dev"),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_message(tmp_path, args, expected):
    result = run_accel(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_weights_name_the_tiny_alternative_and_where_it_stopped(tmp_path):
    result = run_accel("recipe=flux_fbcache", "hydra.run.dir=run", cwd=tmp_path)
    assert "model=flux_tiny" in result.stderr and "stopped during load" in result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["failed_at"] == "load"


def test_calibration_writes_a_cache_option_recipes_can_use(tmp_path):
    run_dir = tmp_path / "cal"
    result = subprocess.run([sys.executable, "-m", "accel.calibrate", "model=flux_tiny", "steps=4",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    option = OmegaConf.load(run_dir / "conf" / "cache" / "teacache_calibrated.yaml")
    cfg = accel.compose(None, ["model=flux_tiny", f"hydra.searchpath=[file://{run_dir / 'conf'}]",
                               "cache=teacache_calibrated"])
    assert cfg.cache.strategy == "teacache" and list(cfg.cache.coefficients) == list(option.coefficients)
    assert len(option.coefficients) == 5


def test_video_models_save_animations(tmp_path):
    run_dir = tmp_path / "run"
    result = run_accel("recipe=wan_fbcache", "model=wan_tiny", "steps=4", "warmup=0", f"hydra.run.dir={run_dir}",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(run_dir / "image_00.gif") as animation:
        assert animation.n_frames == 5
