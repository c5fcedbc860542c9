"""How accel's commands run under Hydra, with three rules Hydra alone does not keep:

* Bad input is one line on stderr and exit code 2, before any folder exists. A single run is composed
  once, validated into its Recipe and checked by the doctor, then gets its folder and runs through
  Hydra's own `run_job` (logging, `.hydra/`, callbacks); `--cfg` prints the validated recipe.
* A run never reuses a folder: the run (or sweep) folder is claimed atomically, also against runs
  started at the same moment, and a folder that already holds something is never written into
  (`NAME.1`, `NAME.2`, … instead), however the run was started, Hydra's replay included.
* A sweep (`-m`) runs every job it can, on whatever Hydra launcher the user chose (basic, joblib,
  submitit, ray, with their own fields): accel's sweeper checks each job before the launcher gets it,
  a job that fails fails alone, the summary is written, and the exit code is 2 if any failed.

Under torchrun, only rank 0 claims a folder and speaks; other ranks work in a scratch folder.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from hydra._internal.callbacks import Callbacks
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra import version
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import run_job
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from accel import resources
from accel.config import (COMPOSE_ERRORS, RUN_DIR, clean_hydra_message, prepare_overrides, recipe_of, setup)
from accel.errors import AccelError, ConfigError, Interrupted
from accel.parallel.mesh import launched_rank
from accel.recipe import Recipe

Task = Callable[[Recipe, Path], None]  # task(recipe, run_dir); raises AccelError for what a user can fix
Preflight = Callable[[Recipe], None]  # checks of a validated recipe before its run gets a folder


def say(message: str) -> None:
    """A line on stderr, from rank 0 alone under torchrun (every rank knows the same thing)."""
    if launched_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def main(task: Task, preflight: Optional[Preflight] = None, task_name: str = "accel") -> None:
    """Run `task` as a Hydra app under the rules above."""
    args = get_args_parser().parse_args()
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        import hydra

        setup()
        hydra.main(config_path=str(resources.conf_dir()), config_name="accel", version_base="1.3")(lambda cfg: None)()
        return
    try:
        failed = _run(args, task, preflight, task_name)
    except AccelError as err:
        say(f"accel: error: {err}")
        sys.exit(2)
    except Interrupted as err:
        say(f"accel: {err}")
        sys.exit(130)
    if failed:
        say(f"accel: {len(failed)} job(s) failed:\n" + "\n".join(f"  {line}" for line in failed))
        sys.exit(2)


def _run(args, task: Task, preflight: Optional[Preflight], task_name: str) -> list[str]:
    setup()
    if args.multirun and args.cfg:
        raise ConfigError(f"--cfg {args.cfg} prints the recipe of one run, and -m runs a sweep: drop -m (with one "
                          "value per field) to see a job's recipe")
    config_dir, config_name = str(resources.conf_dir()), args.config_name or "accel"
    if args.config_path:  # Hydra's replay (--config-path RUN/.hydra --config-name config)
        config_dir = str(Path(args.config_path).expanduser().resolve())
        if not Path(config_dir).is_dir():
            raise AccelError(f"--config-path {args.config_path}: no such folder")
    overrides = prepare_overrides(args.overrides, sweep=args.multirun)
    if args.config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    version.setbase("1.3")  # Hydra's defaults of 1.3 (no chdir into the run folder), as hydra.main(version_base=)
    hydra = Hydra.create_main_hydra2(task_name=task_name, config_search_path=create_config_search_path(config_dir))
    if args.multirun:
        job = SweepJob(task, preflight)
        result = _compose(lambda: hydra.multirun(config_name=config_name, task_function=job, overrides=overrides))
        return [outcome.line() for outcome in getattr(result, "failures", [])]
    cfg = _compose(lambda: hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN,
                                                with_log_configuration=True))
    recipe = recipe_of(cfg, overrides)
    if args.cfg:
        _print_cfg(args.cfg, cfg, recipe)
        return []
    for note in recipe.notes:
        say(f"accel: note: {note}")
    if preflight is not None:
        preflight(recipe)
    run_dir = _run_folder(cfg, replay=config_name != "accel" and not any(o.startswith("hydra.run.dir=")
                                                                         for o in overrides))
    _single_run(hydra, cfg, recipe, run_dir, task)
    return []


def _compose(compose: Callable):
    try:
        return compose()
    except COMPOSE_ERRORS as err:
        raise ConfigError(clean_hydra_message(err)) from None


def _print_cfg(what: str, cfg: DictConfig, recipe: Recipe) -> None:
    if what in ("job", "all"):
        print(OmegaConf.to_yaml(recipe.to_dict()), end="")
    if what in ("hydra", "all"):
        print(OmegaConf.to_yaml({"hydra": OmegaConf.to_container(cfg.hydra)}), end="")


def _run_folder(cfg: DictConfig, replay: bool) -> Path:
    """Rank 0 (or a single process) claims the run folder; other ranks of a torchrun job work in a
    scratch folder that the job removes, so only rank 0 writes next to the user's outputs."""
    if launched_rank() != 0:
        with open_dict(cfg.hydra):
            cfg.hydra.output_subdir = None
        return Path(tempfile.mkdtemp(prefix=f"accel-rank{launched_rank()}-"))
    # a replay composes another primary config, with Hydra's own folder pattern: it still gets ours
    pattern = datetime.now().strftime(RUN_DIR) if replay else cfg.hydra.run.dir
    return claim_folder(Path(pattern).absolute(), marker=cfg.hydra.output_subdir or ".hydra")


def _single_run(hydra: Hydra, cfg: DictConfig, recipe: Recipe, run_dir: Path, task: Task) -> None:
    """Hydra's run (logging, `.hydra/` with the validated recipe as `config.yaml`, callbacks) on the
    config composed once, in the folder claimed for it."""
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.run.dir = str(run_dir)
        cfg.hydra.mode = RunMode.RUN
        for key in [k for k in cfg if k != "hydra"]:
            del cfg[key]
        cfg.merge_with(recipe.to_dict())
    say(f"accel: run folder {run_dir}")
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=cfg.hydra.job.config_name)
    ret = run_job(hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
                  task_function=lambda _: task(recipe, run_dir), config=cfg, job_dir_key="hydra.run.dir",
                  job_subdir_key=None)
    callbacks.on_run_end(config=cfg, config_name=cfg.hydra.job.config_name, job_return=ret)
    ret.return_value  # the task's exception, if it raised one


def claim_folder(path: Path, marker: str = ".hydra") -> Path:
    """A new folder at `path`, or at `path.1`, `path.2`, … when `path` holds something. Claiming is atomic:
    a folder is this process's once it made it, or made `marker` in it while it was empty (a `.../` name
    ending in a file, `marker.yaml`, is created as a file), so runs started together never share one."""
    candidate, n = path, 0
    while True:
        try:
            candidate.mkdir(parents=True)
            _make_marker(candidate / marker)
            return candidate
        except FileExistsError:
            try:
                if candidate.is_dir() and not any(candidate.iterdir()):
                    _make_marker(candidate / marker)  # raises FileExistsError if another run got here first
                    return candidate
            except FileExistsError:
                pass
        except OSError as err:
            raise AccelError(f"cannot create the run folder {candidate}: {err.strerror or err}; set hydra.run.dir "
                             "(or hydra.sweep.dir, tune.dir) to a folder you can write") from None
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")


def _make_marker(path: Path) -> None:
    if path.suffix:
        path.open("x").close()
    else:
        path.mkdir()


# -- sweeps -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class JobOutcome:
    """How one job of a sweep ended (picklable: launchers bring it back from other processes)."""

    num: Optional[int]
    overrides: list[str]
    error: Optional[str] = None  # the first line of why it failed; None if it ran

    def label(self) -> str:
        return (f"#{self.num} " if self.num is not None else "") + f"({' '.join(self.overrides)})"

    def line(self) -> str:
        return f"{self.label()}: {self.error}"


class SweepJob:
    """The task function of a sweep's jobs, wherever the launcher runs them: a job that fails returns why
    (its traceback in its folder), so one failure never ends the sweep. `check` is what accel's sweeper
    asks of each job before launching it."""

    def __init__(self, task: Task, preflight: Optional[Preflight]):
        self.task, self.preflight = task, preflight

    def check(self, cfg: DictConfig, overrides: list[str]) -> Recipe:
        recipe = recipe_of(cfg, overrides)
        if self.preflight is not None:
            self.preflight(recipe)
        return recipe

    def __call__(self, cfg: DictConfig) -> JobOutcome:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        outcome = JobOutcome(hydra_cfg.job.num, list(hydra_cfg.overrides.task))
        print(f"accel: job {outcome.label()}", flush=True)
        try:
            checked = hydra_cfg.sweeper._target_.endswith("EveryJobSweeper")  # accel's sweeper checked it already
            recipe = recipe_of(cfg, outcome.overrides) if checked else self.check(cfg, outcome.overrides)
            self.task(recipe, run_dir)
        except AccelError as err:
            outcome.error = str(err).splitlines()[0]
        except Exception as err:  # noqa: BLE001  a crash fails this job alone, its traceback in its folder
            (run_dir / "traceback.txt").write_text("".join(traceback.format_exception(err)))
            outcome.error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]} (traceback: {run_dir / 'traceback.txt'})"
        if outcome.error:
            print(f"accel: error: {outcome.line()}", file=sys.stderr, flush=True)
        return outcome


def discard(run_dir: Path) -> None:
    """Remove a folder that holds only what Hydra wrote for a job that never started."""
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for log in run_dir.glob("*.log"):
        if log.stat().st_size == 0:
            log.unlink()
    try:
        run_dir.rmdir()
    except OSError:
        pass


def quoted(value: str) -> str:
    """A path as a quoted override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

