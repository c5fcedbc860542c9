"""What an install brings: the declared dependencies, a wheel that carries conf/ and recipes/ (every
recipe composes from anywhere), and a CI script that runs the README's test command as written."""
import importlib.metadata
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_is_a_core_dependency():
    # diffusers needs accelerate to load Wan (low_cpu_mem_usage with keep_in_fp32_modules) and warns
    # on every model without it; peft (a test extra) must not be what brings it in.
    requirements = [Requirement(r) for r in importlib.metadata.requires("accel") or []]
    core = {r.name.lower() for r in requirements if r.marker is None}
    assert "accelerate" in core, (
        f"the installed accel does not require accelerate unconditionally ({sorted(map(str, requirements))}); "
        "add it to [project] dependencies in pyproject.toml (and reinstall)")


def _readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("Run the tests:")
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    block = [line for line in lines[fence + 1:end] if line.strip()]
    assert len(block) == 1, f"the README's test command should be one line: {block}"
    return block[0].strip()


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    command = _readme_test_command()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    code = [line for line in ci if line and not line.startswith("#")]
    assert command in code, f"{ROOT / '.ci' / 'run'} does not run the README's test command verbatim: {command}"
    before = code[:code.index(command)]
    assert any(" -m venv " in line for line in before), "CI should create a fresh venv before the test command"
    assert any("bin/activate" in line for line in before), "CI should activate that venv before the test command"


def _site_dirs() -> list[str]:
    """Where this interpreter imports installed packages from (its venv's or the system's, and the user's)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    return [p for p in dict.fromkeys(paths) if Path(p).is_dir()]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_finds_every_recipe(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("accel-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    # torch & co. from this interpreter's site-packages, whether it is a venv's or the system's: a .pth
    # appends them after the new venv's own site-packages, so the wheel's accel is found first (plain
    # paths in a .pth do not run the .pth files there, so an editable accel of ours stays out).
    nested_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    (Path(nested_site) / "zz_parent_site_packages.pth").write_text("".join(f"{p}\n" for p in _site_dirs()))
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import accel, accel.resources as r\n"
        f"env = Path({str(env_dir.resolve())!r})\n"
        "assert Path(accel.__file__).resolve().is_relative_to(env), (accel.__file__, sys.path)\n"
        "assert r.conf_dir().is_dir() and r.conf_dir().resolve().is_relative_to(env), r.conf_dir()\n"
        f"for name in {recipes!r}:\n"
        "    accel.compose(name, ['model=flux_tiny'])\n"
        "print('ok')\n"
    )
    result = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
