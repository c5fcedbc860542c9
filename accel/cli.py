"""How accel's commands run under Hydra, with three rules Hydra alone does not keep:

* Bad input is one line on stderr and exit code 2, before any folder exists: a single run is
  composed and validated here first (Hydra would print its own multi-line report and exit 1).
* A run never reuses a folder: the run (or sweep) folder is claimed here, atomically, and a folder
  that already holds something is never written into (`NAME.1`, `NAME.2`, … instead), however the
  job was started — Hydra's own replay (`--config-path RUN/.hydra --config-name config`) included.
* A sweep runs every job it can: a job whose overrides do not compose or validate fails alone, the
  failed ones are listed at the end, and the exit code is 2.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import hydra
import yaml
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from accel import resources
from accel.errors import AccelError

RUN_DIR = "outputs/%Y-%m-%d/%H-%M-%S-%f"  # strftime; to the microsecond, and claimed atomically below
SWEEP_DIR = "multirun/%Y-%m-%d/%H-%M-%S-%f"
Task = Callable[[DictConfig, Path], None]  # task(cfg, run_dir); raises AccelError for what a user can fix
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, yaml.YAMLError)

_failures: list[str] = []  # what failed in this process, one line each
failed_jobs: dict[int, tuple[list[str], str]] = {}  # a sweep's failed jobs: number -> (overrides, why)
_checked = False  # a single run's recipe was validated and checked before its folder was claimed


def main(task: Task, preflight: Optional[Callable[[DictConfig], None]] = None) -> None:
    """Run `task` as a Hydra app under the rules above. `preflight(cfg)` adds checks of a validated
    recipe that must pass before a single run gets its folder (e.g. the model's size multiple)."""
    from accel.config import setup

    args = get_args_parser().parse_args()
    try:
        setup()
        if not (args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun):
            _prepare(args, preflight)
    except AccelError as err:
        _exit_with(f"accel: error: {err}")
    hydra.main(config_path=str(resources.conf_dir()), config_name="accel", version_base="1.3")(
        lambda cfg: _run_task(task, cfg, preflight))()
    if len(_failures) > 1 or (_failures and HydraConfig.initialized() and _is_sweep()):
        _exit_with(f"accel: {len(_failures)} job(s) failed:\n" + "\n".join(f"  {line}" for line in _failures))
    if _failures:
        sys.exit(2)


def plain(command: Callable[[], None]) -> None:
    """Run a command that is not a Hydra app (`accel.list`) under the same rule for bad input."""
    try:
        command()
    except AccelError as err:
        _exit_with(f"accel: error: {err}")


def _exit_with(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def _is_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _prepare(args, preflight) -> None:
    """Validate a single run and claim its folder; claim a sweep's folder. Rewrites sys.argv."""
    from accel.config import compose_raw, validate

    global _checked
    config_dir = None
    if args.config_path:  # Hydra's replay: make a path relative to here absolute, as users mean it
        config_dir = str(Path(args.config_path).expanduser().resolve())
        if not Path(config_dir).is_dir():
            raise AccelError(f"--config-path {args.config_path}: no such folder")
        _replace_argument(args.config_path, config_dir)
    overrides = list(args.overrides)
    if args.config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    config_name = args.config_name or "accel"
    if args.multirun:
        # only the folder is settled here; each job is composed and validated when it runs
        plain = [o for o in overrides if o.startswith("hydra.") and "," not in o]
        cfg = compose_raw(plain, config_dir=config_dir, config_name=config_name)
        _set_folder("hydra.sweep.dir", _folder_of_this_rank(Path(cfg.hydra.sweep.dir)))
        return
    cfg = compose_raw(overrides, config_dir=config_dir, config_name=config_name)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate(job)
    if args.cfg:
        return
    if preflight is not None:
        preflight(job)
    _checked = True
    run_dir = cfg.hydra.run.dir
    if config_name != "accel" and not any(o.startswith("hydra.run.dir=") for o in overrides):
        run_dir = datetime.now().strftime(RUN_DIR)  # another primary config (a replay): still our folders
    _set_folder("hydra.run.dir", _folder_of_this_rank(Path(run_dir)))


def _replace_argument(old: str, new: str) -> None:
    sys.argv = [new if a == old else (a.replace(old, new, 1) if a.startswith("--config-path=") else a)
                for a in sys.argv]


def _set_folder(key: str, folder: Path) -> None:
    quoted = "'" + str(folder).replace("\\", "\\\\").replace("'", "\\'") + "'"
    sys.argv = [a for a in sys.argv if not a.startswith(f"{key}=")] + [f"{key}={quoted}"]


def _folder_of_this_rank(path: Path) -> Path:
    """Rank 0 (or a single process) claims the run folder; other ranks of a torchrun job work in a
    scratch folder that the job removes, so only rank 0 writes next to the user's outputs."""
    from accel.parallel.mesh import launched_rank

    if launched_rank() == 0:
        return claim_folder(path)
    sys.argv.append("hydra.output_subdir=null")
    return Path(tempfile.mkdtemp(prefix=f"accel-rank{launched_rank()}-"))


def claim_folder(path: Path) -> Path:
    """A new folder at `path`, or at `path.1`, `path.2`, … when `path` already holds something."""
    candidate, n = path, 0
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate
            n += 1
            candidate = path.with_name(f"{path.name}.{n}")


def _run_task(task: Task, cfg: DictConfig, preflight) -> None:
    from accel.config import validate

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job = (hydra_cfg.job.num, list(hydra_cfg.overrides.task)) if _is_sweep() else None
    if job:
        print(f"accel: job {job_label(*job)}")
    try:
        if job or not _checked:  # sweep jobs are composed by Hydra and checked here, one by one
            validate(cfg)
            if preflight is not None:
                preflight(cfg)
    except AccelError as err:
        _discard(run_dir)
        record_failure(err, job)
        return
    try:
        task(cfg, run_dir)
    except AccelError as err:
        record_failure(err, job)
    except Exception as err:  # noqa: BLE001
        if not job:
            raise
        # in a sweep, a job that crashed fails alone, its traceback in its folder, and the sweep goes on
        import traceback

        (run_dir / "traceback.txt").write_text("".join(traceback.format_exception(err)))
        first_line = (str(err).splitlines() or [""])[0]
        record_failure(AccelError(f"{type(err).__name__}: {first_line} (traceback: {run_dir / 'traceback.txt'})"), job)


def job_label(num: int, overrides: list[str]) -> str:
    return f"#{num} ({' '.join(overrides)})"


def record_failure(err: Exception, job: Optional[tuple[int, list[str]]] = None) -> None:
    """Print a failure and keep it for the end of the run (and a sweep's summary)."""
    message = str(err)
    if job:
        failed_jobs[job[0]] = (job[1], message.splitlines()[0])
        line = f"{job_label(*job)}: {message}"
        _failures.append(line.splitlines()[0])
    else:
        line = message
        _failures.append(line)
    print(f"accel: error: {line}", file=sys.stderr)


def _discard(run_dir: Path) -> None:
    """Remove a folder that holds only what Hydra wrote for a job that never started."""
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for log in run_dir.glob("*.log"):
        if log.stat().st_size == 0:
            log.unlink()
    try:
        run_dir.rmdir()
    except OSError:
        pass
