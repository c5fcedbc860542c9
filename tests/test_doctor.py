"""The doctor answers before any weights load, and lists every problem, missing weights included."""
import pytest

import accel
from accel.doctor import diagnose


def test_missing_weights_and_the_other_problems_are_all_listed():
    problems = diagnose(accel.compose("flux_fast", ["quant.kind=float8_dynamic", "compile.mode=reduce-overhead"]))
    assert len(problems) == 3
    assert "black-forest-labs/FLUX.1-dev" in problems[0] and "model=flux_tiny" in problems[0]
    assert problems[1].startswith("quant.kind='float8_dynamic'") and "8.9" in problems[1]
    assert problems[2].startswith("compile.mode='reduce-overhead'")


def test_a_recipe_that_fits_has_no_problems():
    assert diagnose(accel.compose("flux_fast", ["model=flux_tiny"])) == []


@pytest.mark.slow
def test_the_doctor_command_exits_2_listing_problems(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "accel.doctor", "recipe=flux_mbcache", "model=flux_tiny",
                             "cache.first_blocks=12", "height=99"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2 and result.stdout.count("problem:") == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
