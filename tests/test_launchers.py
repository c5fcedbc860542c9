"""Sweeps on Hydra's own launchers, with their own fields: joblib (processes on this machine) and
submitit's local executor (what runs on SLURM with submitit_slurm). A job that fails fails alone, the
others run and the summary is written."""
import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_sweep_runs_on_hydras_launcher_with_its_own_fields(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "accel", "-m", "recipe=flux_fbcache", "model=flux_tiny", "steps=3", "warmup=0",
         "cache.residual_diff_threshold=0,-1,abc,1e9", f"hydra.sweep.dir={sweep}", *LAUNCHERS[launcher]],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 2, result.stderr[-3000:]  # two jobs failed: the sweep says so
    assert "Traceback" not in result.stderr and "2 job(s) failed" in result.stderr
    assert "#1 (" in result.stderr and "cache.residual_diff_threshold=-1.0 is not allowed" in result.stderr
    assert "#2 (" in result.stderr and "'abc'" in result.stderr  # a value that does not even compose
    reports = {i: json.loads((sweep / str(i) / "report.json").read_text()) for i in (0, 3)}
    assert [r["stats"]["cache"]["cached"] for r in reports.values()] == [0, 2]
    assert not (sweep / "1").exists() and not (sweep / "2").exists()  # the bad jobs never got a folder
    with open(sweep / "summary.csv") as table:
        rows = {int(row["job"]): row for row in csv.DictReader(table)}
    assert [rows[i]["status"] for i in range(4)] == ["ok", "failed", "failed", "ok"]
    assert "is not allowed" in rows[1]["stopped"] and "abc" in rows[2]["stopped"]


def test_two_sweeps_into_one_folder_get_a_folder_each(tmp_path):
    sweep = tmp_path / "sweep"
    for _ in range(2):
        result = subprocess.run([sys.executable, "-m", "accel", "-m", "model=flux_tiny", "steps=1", "warmup=0",
                                 "seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    for folder in (sweep, tmp_path / "sweep.1"):
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0", "1"]
        assert (folder / "summary.csv").exists()
