"""`python -m accel` end to end, as a user runs it: run folders, reports, sweeps, replays, and the one
clear line (exit code 2, no traceback, no folder) that every bad input gets."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from omegaconf import OmegaConf

import accel

pytestmark = pytest.mark.slow
FAST = ["model=flux_tiny", "steps=4", "warmup=0"]
FASTER = ["model=flux_tiny", "steps=2", "warmup=0"]


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
    assert accel.compose("recipe").to_dict() == report["recipe"]


def test_the_reported_quality_is_the_output_against_the_baseline(tmp_path):
    """A cache that hits on every step after the first: the report's figures compare the two images it
    saved (PNGs round to 1/255, so within that), not an image with itself."""
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fbcache", *FAST, "compare=true", "repeats=1", "cache.residual_diff_threshold=1e9",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    quality = json.loads((run_dir / "report.json").read_text())["baseline"]["quality"]
    from PIL import Image
    import numpy as np

    image, baseline = (np.asarray(Image.open(run_dir / f"{stem}_00.png"), dtype=float) / 255
                       for stem in ("image", "baseline"))
    assert not quality["identical"] and 0 < quality["mean_abs"]
    assert quality["mean_abs"] == pytest.approx(np.abs(image - baseline).mean(), abs=1 / 255)
    assert quality["psnr"] < 100 and quality["ssim"] < 1


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
    assert OmegaConf.load(original / ".hydra" / "config.yaml") == OmegaConf.create(reports[0])  # the validated recipe


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
    # found trying user mistakes from a fresh clone (issues 16 and 17)
    "-m with --cfg": (["-m", "model=flux_tiny", "seed=1,2", "--cfg", "job"], {}, ["--cfg job prints the recipe of one run"]),
    "a huge size": (["model=flux_tiny", "height=100000", "width=100000"], {},
                    ["height=100000, width=100000 is not allowed here: decoding it needs at least", "GiB"]),
    "a folder under /proc": (["model=flux_tiny", "hydra.run.dir=/proc/accel-x"], {}, ["cannot create the run folder"]),
    "a folder under a file": (["model=flux_tiny", "hydra.run.dir={recipes}/evil.yaml/run"], {},
                              ["cannot create the run folder", "evil.yaml"]),
    "a resolver in a recipe": (["recipe=leaky"], RECIPES, ["leaky.yaml", "prompt", "calls the resolver 'oc.env'"]),
    "a resolver on the command line": (["model=flux_tiny", "negative_prompt=${oc.env:HOME}"], {},
                                       ["negative_prompt calls the resolver 'oc.env'"]),
    "an empty recipe": (["recipe=empty"], RECIPES, ["recipe 'empty'", "is empty"]),
    "a recipe given twice": (["recipe=flux_fbcache", "recipe=flux_fast"], {}, ["recipe is given twice"]),
    "a seed too large": (["model=flux_tiny", "seed=99999999999999999999"], {}, ["seed=99999999999999999999"]),
    "no model": (["model=null"], {}, ["model=null is not allowed"]),
    "negative guidance": (["model=flux_tiny", "guidance_scale=-5"], {}, ["guidance_scale=-5.0 is not allowed"]),
    "a cache that can never hit": (["recipe=flux_fbcache", "model=flux_tiny", "steps=2", "cache.warmup_steps=100"], {},
                                   ["cache.warmup_steps=100", "leave no step of the 2 that may be cached"]),
    "more steps than the scheduler has": (["model=flux_tiny", "steps=100000000"], {},
                                          ["steps=100000000 is not allowed: at most 1000"]),
    "the wrong polynomial": (["recipe=flux_teacache", "model=flux_tiny", "cache.coefficients=[1,2]"], {},
                             ["cache.coefficients=[1.0, 2.0] is not allowed", "order-4 polynomial"]),
    "sdxl has no ulysses": (["recipe=sdxl_fbcache", "model=sdxl_tiny", "parallel=ulysses2"], {},
                            ["sdxl's UNet2DConditionModel has no sequence parallelism", "cfg=2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_exit_2_and_no_folder(tmp_path, case):
    args, env, expected = BAD_INPUTS[case]
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "evil.yaml").write_text(textwrap.dedent(EVIL))
    (recipes / "broken.yaml").write_text(textwrap.dedent(BROKEN))
    (recipes / "leaky.yaml").write_text("defaults:\n  - override /model: flux_tiny\nprompt: ${oc.env:PATH}\n")
    (recipes / "empty.yaml").write_text("# nothing here yet\n")
    result = run_accel(*(a.replace("{recipes}", str(recipes)) for a in args), cwd=tmp_path,
                       env={k: v.format(recipes=recipes) for k, v in env.items()})
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
    import numpy as np
    from PIL import Image, ImageSequence

    with Image.open(run_dir / "image_00.gif") as animation:
        assert animation.n_frames == 5
    # video quality: PSNR per frame and temporal flicker beside the image figures
    quality = json.loads((run_dir / "report.json").read_text())["baseline"]["quality"]
    assert len(quality["frame_psnr"]) == 5 and "ssim" in quality
    from accel import metrics

    gif = lambda stem: np.stack([np.asarray(f.convert("RGB"), dtype=float) / 255  # noqa: E731
                                 for f in ImageSequence.Iterator(Image.open(run_dir / f"{stem}_00.gif"))])[None]
    # the flicker of the saved animations (GIF quantizes colours: within a few hundredths)
    assert quality["flicker"] == pytest.approx(metrics.flicker(gif("image"), gif("baseline")), abs=0.03)
    assert "per-frame PSNR" in result.stdout and "flicker" in result.stdout


def test_runs_started_together_into_one_folder_get_a_folder_each(tmp_path):
    """Claiming a folder is atomic: three runs started at the same moment with the same hydra.run.dir."""
    run_dir = tmp_path / "run"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "accel", "recipe=flux_fbcache", *FASTER, f"seed={seed}",
                              f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for seed in range(3)]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()
    folders = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run"))
    assert [p.name for p in folders] == ["run", "run.1", "run.2"]
    seeds = set()
    for folder in folders:
        assert sorted(p.name for p in folder.glob("*.png")) == ["image_00.png"]  # one run's outputs alone
        seeds.add(json.loads((folder / "report.json").read_text())["recipe"]["seed"])
        assert (folder / ".hydra" / "config.yaml").exists()
    assert seeds == {0, 1, 2}


def test_a_users_recipe_takes_precedence_over_a_shipped_one_and_the_report_names_its_file(tmp_path):
    """The README's own example: my_recipes/flux_fast.yaml is what `recipe=flux_fast` runs."""
    mine = tmp_path / "my_recipes"
    mine.mkdir()
    (mine / "flux_fast.yaml").write_text(textwrap.dedent("""
        defaults:
          - override /model: flux
          - override /cache: fbcache
        cache:
          residual_diff_threshold: 0.12
          max_consecutive_hits: 3
        steps: 28
    """))
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fast", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path,
                       env={"ACCEL_RECIPES": str(mine)})
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe_file"] == str(mine / "flux_fast.yaml")
    assert report["recipe"]["cache"]["residual_diff_threshold"] == 0.12
    assert report["recipe"]["cache"]["max_consecutive_hits"] == 3
    assert report["recipe"]["quant"]["strategy"] == "none"  # the shipped flux_fast quantizes
    assert "takes precedence over" in result.stderr and "recipes/flux_fast.yaml" in result.stderr


def test_missing_weights_while_the_hub_does_not_answer_fail_in_seconds_before_a_folder(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    environment["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a hub that refuses at once, whatever network this has
    environment["HF_HOME"] = str(tmp_path / "hf")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "accel", "recipe=flux_fbcache", "height=99"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 60
    [error] = [line for line in result.stderr.splitlines() if line.startswith("accel: error:")]
    assert "black-forest-labs/FLUX.1-dev" in error and "the hub does not answer" in error and "model=flux_tiny" in error
    assert "(and 1 more" in error  # height=99, known from FLUX's published sizes without its files
    assert not (tmp_path / "outputs").exists()
    doctor = subprocess.run([sys.executable, "-m", "accel.doctor", "recipe=flux_fbcache", "height=99"], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert doctor.returncode == 2 and doctor.stdout.count("problem:") == 2
    assert "height=99 is not allowed: a multiple of 16" in doctor.stdout


def test_a_prompt_with_commas_brackets_and_quotes_is_taken_as_written(tmp_path):
    prompt = "a red fox, at night {moonlit} [35mm] it's \"sharp\""
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fbcache", *FASTER, f"prompt={prompt}", "negative_prompt=blurry, low quality",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recipe = json.loads((run_dir / "report.json").read_text())["recipe"]
    assert recipe["prompt"] == prompt and recipe["negative_prompt"] == "blurry, low quality"


def test_ctrl_c_says_where_it_stopped_keeps_the_report_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "accel", "recipe=flux_fbcache", "model=flux_tiny", "steps=400",
                            "warmup=0", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 300
    while not (run_dir / "recipe.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(8)  # into the generation
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "accel: interrupted during generate" in stderr and "Traceback" not in stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["failed_at"] == "generate" and "interrupted" in report["error"] and report["timings"]["load_s"] > 0


def test_compare_labels_its_progress_bars_and_names_the_folder_first(tmp_path):
    run_dir = tmp_path / "run"
    result = run_accel("recipe=flux_fbcache", *FASTER, "compare=true", "repeats=2",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"accel: run folder {run_dir}"
    for label in ("baseline (round 1/2)", "accelerated (round 1/2)", "baseline (round 2/2)", "accelerated (round 2/2)"):
        assert label in result.stderr


def test_a_long_prompt_is_said_to_be_cut_once(tmp_path):
    result = run_accel("recipe=flux_fbcache", *FASTER, "prompt=" + "a red fox " * 1000, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    [note] = [line for line in output.splitlines() if "is longer than the text encoders read" in line]
    assert "CLIPTokenizer reads 77 of its" in note and "reads 512 of its" in note  # CLIP, then T5
    assert "a red fox a red fox a red fox" not in output and "truncated" not in output


def test_flux_fast_says_nothing_a_user_cannot_act_on(tmp_path):
    result = run_accel("recipe=flux_fast", *FASTER, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for noise in ("Failed to load", "_C_mxfp8", "_stable_hash_for_caching", "is an Enum subclass", "torchao` Tensor",
                  "kept in float32: []", "Couldn't connect to the Hub", "Traceback"):
        assert noise not in output, noise


def test_under_torchrun_a_refused_recipe_is_said_once(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "accel", "model=flux_tiny", "cache=fbcache", "cache.residual_diff_threshold=-1"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("accel: error: cache.residual_diff_threshold=-1.0 is not allowed") == 1
    assert "exitcode  : 2" in result.stderr and not (tmp_path / "outputs").exists()


def test_the_doctors_help_is_a_usage_line(tmp_path):
    result = run_module("accel.doctor", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m accel.doctor")
    assert "Traceback" not in result.stderr


def test_calibrating_a_model_teacache_does_not_apply_to_leaves_no_folder(tmp_path):
    result = run_module("accel.calibrate", "model=sdxl_tiny", cwd=tmp_path)
    assert result.returncode == 2 and "TeaCache does not apply to it" in result.stderr
    assert not (tmp_path / "outputs").exists()
