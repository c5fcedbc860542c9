"""A non-editable install carries conf/ and recipes/: every recipe composes from anywhere."""
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_wheel_in_a_fresh_venv_finds_every_recipe(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("accel-*.whl"))
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)  # torch & co. from the system
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    script = (
        "import accel, accel.resources as r\n"
        "assert 'site-packages' in accel.__file__, accel.__file__\n"
        "assert r.conf_dir().is_dir() and 'site-packages' in str(r.conf_dir())\n"
        f"for name in {recipes!r}:\n"
        "    accel.compose(name, ['model=flux_tiny'])\n"
        "print('ok')\n"
    )
    result = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
