"""`python -m accel` end to end, as a user runs it: run folders, reports, sweeps, replays, and the one
clear line (exit code 2, no traceback, no folder) that every bad input gets."""
import csv
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

import accel

pytestmark = pytest.mark.slow
FAST = ["model=flux_tiny", "steps=4", "warmup=0"]


def run_module(module, *args, cwd, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)


def run_accel(*args, cwd, env=None):
    return run_module("accel", *args, cwd=cwd, env=env)


def run_folders(root):
    return sorted(p.parent for p in root.glob("outputs/*/*/.hydra"))


def test_main_job_saves_images_report_and_replayable_recipe(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fbcache", *FAST, "compare=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "hit map" in result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"]["cache"]["strategy"] == "fbcache"
    assert set(report["timings"]) >= {"load_s", "apply_s", "first_call_s", "accelerated"}
    assert report["stats"]["cache"]["steps"] == 4 and len(report["stats"]["cache"]["hit_map"][0]) == 4
    assert report["environment"]["torch"] and report["environment"]["device"] == "cpu"
    assert (run_dir / "image_00.png").exists() and (run_dir / "baseline_00.png").exists()
    # compare: both variants timed in 3 alternating rounds by default, medians with their ranges
    base, fast = report["baseline"], report["timings"]["accelerated"]
    assert base["rounds"] == 3 and len(fast["runs_s"]) == 3 and len(base["timings"]["runs_s"]) == 3
    assert fast["min_s"] <= fast["per_image_s"] <= fast["max_s"]
    assert {"speedup", "speedup_range", "measurable", "quality"} <= set(base)
    # quality: every metric that applies to images and their latents; none of the video ones
    quality = base["quality"]
    assert {"psnr", "ssim", "mean_abs", "max_abs", "latent_relative_l2", "latent_max_abs"} <= set(quality)
    assert not {"flicker", "frame_psnr", "task_accuracy"} & set(quality)
    assert 0 < quality["ssim"] <= 1 and quality["max_abs"] >= quality["mean_abs"] >= 0
    assert "SSIM" in result.stdout and "latents" in result.stdout

    monkeypatch.setenv("ACCEL_RECIPES", str(run_dir))
    assert accel.compose("recipe") == OmegaConf.create(report["recipe"])


def test_the_toy_model_reports_task_accuracy_beside_the_baselines(tmp_path):
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fbcache", "model=flux_toy", "steps=10", "warmup=0", "repeats=1", "compare=true",
                       "metrics=[psnr,task_accuracy]", "prompt=a large red circle at the top left",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    quality = json.loads((run_dir / "report.json").read_text())["baseline"]["quality"]
    assert set(quality) == {"psnr", "task_accuracy", "baseline_task_accuracy", "identical"}
    assert quality["task_accuracy"] == quality["baseline_task_accuracy"] == 1.0
    assert "task accuracy   1.00 (baseline 1.00)" in result.stdout


def test_a_second_run_into_the_same_folder_goes_beside_it(tmp_path):
    run_dir = tmp_path / "run"
    for _ in range(2):
        result = run_accel("recipe=flux_fbcache", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    first, second = (json.loads((d / "report.json").read_text()) for d in (run_dir, tmp_path / "run.1"))
    assert first["recipe"] == second["recipe"] and (tmp_path / "run.1" / "image_00.png").exists()


def test_hydra_replays_never_overwrite_a_run_and_their_recipes_replay_again(tmp_path):
    assert run_accel("recipe=flux_fbcache", *FAST, "seed=3", cwd=tmp_path).returncode == 0
    [original] = run_folders(tmp_path)
    before = {p.name: p.read_bytes() for p in original.rglob("*") if p.is_file()}
    for _ in range(2):  # twice within the same second as often as not
        result = run_accel("--config-path", str(original / ".hydra"), "--config-name", "config", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    folders = run_folders(tmp_path)
    assert len(folders) == 3
    assert {p.name: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
    # a replay's own recipe.yaml replays on its own, typed: a wrong type is still refused
    replay = folders[-1]
    again = run_accel("recipe=recipe", cwd=tmp_path, env={"ACCEL_RECIPES": str(replay)})
    assert again.returncode == 0, again.stderr
    reports = [json.loads((d / "report.json").read_text())["recipe"] for d in run_folders(tmp_path)]
    assert all(r == reports[0] for r in reports) and reports[0]["seed"] == 3


def test_cfg_job_prints_the_composed_recipe(tmp_path):
    result = run_accel("recipe=flux_fbcache", "model=flux_tiny", "cache.residual_diff_threshold=0.05", "--cfg", "job",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.cache.residual_diff_threshold == 0.05 and cfg.model.architecture == "flux"


def test_a_sweep_runs_every_valid_job_and_lists_the_failed_ones(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_accel("-m", "recipe=flux_fbcache", *FAST, "compare=true", "repeats=1",
                       "cache.residual_diff_threshold=0,-1,abc,1e9", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2
    reports = {i: json.loads((sweep / str(i) / "report.json").read_text()) for i in (0, 3)}
    assert [r["stats"]["cache"]["cached"] for r in reports.values()] == [0, 3]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "3"]  # nothing left of the failed
    summary = result.stderr[result.stderr.index("2 job(s) failed"):]
    assert "#1" in summary and "residual_diff_threshold=-1" in summary and "#2" in summary and "'abc'" in summary
    assert "Traceback" not in result.stderr

    # the sweep's summary: every job a row, the failed ones marked, the pictures beside them
    with open(sweep / "summary.csv") as table:
        rows = {int(row["job"]): row for row in csv.DictReader(table)}
    assert sorted(rows) == [0, 1, 2, 3]
    assert [rows[i]["status"] for i in range(4)] == ["ok", "failed", "failed", "ok"]
    assert "is not allowed" in rows[1]["stopped"] and "abc" in rows[2]["stopped"]
    assert rows[0]["psnr_db"] == "inf" and float(rows[3]["psnr_db"]) < 60 and rows[3]["cached"] == "3"
    assert rows[3]["settings"] == "cache.residual_diff_threshold=1000000000.0"  # as Hydra writes it
    assert (sweep / "summary.md").read_text().count("**FAILED**") == 2
    page = (sweep / "index.html").read_text()
    for picture in ("tradeoff.png", "grid.png", "hitmap.png"):
        assert (sweep / picture).stat().st_size > 1000 and f'src="{picture}"' in page
    assert "sweep summary of 4 jobs" in result.stdout


EVIL = """
    hydra:
      callbacks:
        boom:
          _target_: os.system
    """
BROKEN = """
    defaults:
      - override /cache: fbcache
    cache:
      residual_diff_threshold: [0.1
    """
RECIPES = {"ACCEL_RECIPES": "{recipes}"}
BAD_INPUTS = {  # case: (arguments, environment, fragments of the one error line)
    "unknown recipe": (["recipe=no_such_recipe"], {}, ["recipe/no_such_recipe", "flux_fbcache"]),
    "unknown option": (["recipe=flux_fbcache", "cache=warp"], {}, ["cache/warp", "fbcache"]),
    "unknown key": (["recipe=flux_fbcache", "cache.bogus=1"], {}, ["bogus"]),
    "appended key": (["recipe=flux_fbcache", "model=flux_tiny", "+cache.residual_dif_threshold=0.1"], {},
                     ["cache.residual_dif_threshold is not a field", "residual_diff_threshold"]),
    "appended top-level key": (["recipe=flux_fbcache", "model=flux_tiny", "+sed=1"], {}, ["sed is not a field"]),
    "wrong type": (["recipe=flux_fbcache", "cache.residual_diff_threshold=fast"], {}, ["fast", "Float"]),
    "out of range": (["recipe=flux_fbcache", "model=flux_tiny", "cache.residual_diff_threshold=-1"], {},
                     ["cache.residual_diff_threshold=-1.0 is not allowed"]),
    "empty window": (["recipe=flux_fbcache", "model=flux_tiny", "cache.start=0.5", "cache.end=0.5"], {},
                     ["cache.start=0.5", "end=0.5"]),
    "removed field": (["recipe=flux_fbcache", "model=flux_tiny", "~prompt"], {}, ["prompt cannot be removed"]),
    "frames on an image model": (["model=flux_tiny", "num_frames=5"], {}, ["num_frames=5", "wan"]),
    "flux size": (["model=flux_tiny", "height=99"], {}, ["height=99", "multiple of 4", "96 or 100"]),
    "sdxl size": (["model=sdxl_tiny", "width=36"], {}, ["width=36", "multiple of 8"]),
    "wan size": (["model=wan_tiny", "height=40"], {}, ["height=40", "multiple of 16"]),
    "wan frames": (["model=wan_tiny", "num_frames=6"], {}, ["num_frames=6", "4·k + 1"]),
    "missing weights": (["recipe=flux_fbcache"], {}, ["black-forest-labs/FLUX.1-dev", "model=flux_tiny"]),
    "_target_ in a recipe": (["recipe=evil"], RECIPES, ["_target_", "hydra.callbacks.boom"]),
    "YAML syntax": (["recipe=broken"], RECIPES, ["broken.yaml, line 6, column 1", "YAML"]),
    "ACCEL_RECIPES missing": (["recipe=x"], {"ACCEL_RECIPES": "{recipes}/nowhere"}, ["ACCEL_RECIPES", "missing"]),
    "ACCEL_RECIPES a file": (["recipe=x"], {"ACCEL_RECIPES": "{recipes}/evil.yaml"}, ["ACCEL_RECIPES", "a file"]),
    "unknown metric": (["model=flux_tiny", "metrics=[psnr,fid]"], {}, ["metrics", "'fid'", "psnr, ssim"]),
    "metrics not a list": (["model=flux_tiny", "metrics=psnr"], {}, ["metrics"]),
    "--cfg job validates": (["model=flux_tiny", "steps=0", "--cfg", "job"], {}, ["steps=0"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_exit_2_and_no_folder(tmp_path, case):
    args, env, expected = BAD_INPUTS[case]
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "evil.yaml").write_text(textwrap.dedent(EVIL))
    (recipes / "broken.yaml").write_text(textwrap.dedent(BROKEN))
    result = run_accel(*args, cwd=tmp_path, env={k: v.format(recipes=recipes) for k, v in env.items()})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("accel: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    for fragment in expected:
        assert fragment in errors[0]
    assert "To append to your config" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_replay_with_a_wrong_type_is_refused(tmp_path):
    assert run_accel("recipe=flux_fbcache", *FAST, cwd=tmp_path).returncode == 0
    [original] = run_folders(tmp_path)
    result = run_accel("--config-path", str(original / ".hydra"), "--config-name", "config", "steps=abc", cwd=tmp_path)
    assert result.returncode == 2 and "steps" in result.stderr and "Traceback" not in result.stderr
    assert run_folders(tmp_path) == [original]


def test_help_is_accels_own(tmp_path):
    result = run_accel("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "recipe=NAME" in result.stdout and "flux_fbcache" in result.stdout and "cache" in result.stdout
    assert "powered by Hydra" not in result.stdout and "schema/" not in result.stdout


def test_a_default_run_says_little_beyond_its_own_output(tmp_path):
    result = run_accel("recipe=flux_fbcache", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "accelerate" not in result.stderr
    [folder] = run_folders(tmp_path)
    assert not list(folder.glob("*.log"))  # no empty log file


def test_calibration_prints_a_command_that_works_as_printed(tmp_path):
    run_dir = tmp_path / "cal"
    result = run_module("accel.calibrate", "model=flux_tiny", "steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    option = OmegaConf.load(run_dir / "conf" / "cache" / "teacache_calibrated.yaml")
    assert len(option.coefficients) == 5 and option.fitted_on == "flux"
    [command] = [line.split("use it: ", 1)[1] for line in result.stdout.splitlines() if "use it: " in line]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "accel"]
    used = run_accel(*words[3:], "warmup=0", cwd=tmp_path)
    assert used.returncode == 0, used.stderr
    report = json.loads(next((tmp_path / "outputs").glob("*/*/report.json")).read_text())
    assert report["recipe"]["cache"]["coefficients"] == list(option.coefficients)


def test_calibration_with_too_few_steps_says_how_many(tmp_path):
    result = run_module("accel.calibrate", "model=flux_tiny", "steps=1", cwd=tmp_path)
    assert result.returncode == 2 and "steps=1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_video_models_save_animations(tmp_path):
    run_dir = tmp_path / "run"
    result = run_accel("recipe=wan_fbcache", "model=wan_tiny", "steps=4", "warmup=0", "compare=true", "repeats=1",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(run_dir / "image_00.gif") as animation:
        assert animation.n_frames == 5
    # video quality: PSNR per frame and temporal flicker beside the image figures
    quality = json.loads((run_dir / "report.json").read_text())["baseline"]["quality"]
    assert len(quality["frame_psnr"]) == 5 and quality["flicker"] >= 0 and "ssim" in quality
    assert "per-frame PSNR" in result.stdout and "flicker" in result.stdout
