"""accel's sweeper for Hydra (Hydra loads plugins from this namespace only).

Hydra's basic sweeper, except in what keeps a sweep going past a bad job, on any launcher the user
picks (`hydra/launcher=joblib`, `submitit_local`, `submitit_slurm`, `ray`, … with their own fields):

* each job is composed and checked (its Recipe, the doctor) before the launcher gets it: one that
  fails is reported and never gets a folder, the others still run (Hydra's basic sweeper composes the
  whole batch up front and stops at the first bad one, and a launcher would fail the whole batch);
* the sweep folder is claimed atomically before anything is written, as a single run's is;
* a job that fails while it runs returns why (accel.cli.SweepJob), and the failures are written to
  `failed_jobs.json` in the sweep folder, where the summary (accel/sweep_report.py) reads them.

Accel's modules are imported inside the methods: Hydra imports every plugin whenever any Hydra app
starts, and those should not pay for torch and diffusers.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict, read_write

FAILED_JOBS = "failed_jobs.json"


@dataclass
class SweepResult:
    returns: list = field(default_factory=list)  # per launched batch, the launcher's JobReturns
    failures: list = field(default_factory=list)  # accel.cli.JobOutcome of every job that failed


class EveryJobSweeper(BasicSweeper):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.task_function = task_function

    def sweep(self, arguments: List[str]) -> SweepResult:
        from accel.cli import JobOutcome, claim_folder, quoted, say

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]),
                                              self.max_batch_size)
        folder = claim_folder(Path(str(self.config.hydra.sweep.dir)), marker="multirun.yaml")
        with read_write(self.config), open_dict(self.config):
            self.config.hydra.sweep.dir = str(folder)
            # the jobs are composed again from these (by the launcher, wherever it runs them)
            self.config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted(str(folder))}")
        OmegaConf.save(self.config, folder / "multirun.yaml")
        result, num = SweepResult(), 0
        total = sum(len(batch) for batch in self.overrides)
        say(f"accel: sweep of {total} job(s) into {folder}")
        while not self.is_done():
            batch = [list(job) for job in self.get_job_batch()]
            problems = [self._problem(job) for job in batch]
            for offset, (job, problem) in enumerate(zip(batch, problems)):
                if problem is not None:
                    outcome = JobOutcome(num + offset, job, problem)
                    say(f"accel: error: {outcome.line()}")
                    result.failures.append(outcome)
            for start, jobs in _runs_of_valid(batch, problems):
                returns = self.launcher.launch(jobs, initial_job_idx=num + start)
                result.returns.append(returns)
                result.failures += [r.return_value for r in returns if _failed(r.return_value)]
            num += len(batch)
        (folder / FAILED_JOBS).write_text(json.dumps([asdict(f) for f in result.failures], indent=2))
        return result

    def _problem(self, overrides: List[str]) -> Optional[str]:
        """Why a job cannot run (it does not compose, validate or pass the doctor); None if it can."""
        from accel.config import COMPOSE_ERRORS, clean_hydra_message
        from accel.errors import AccelError

        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            check = getattr(self.task_function, "check", None)
            if check is not None:
                check(cfg, overrides)
        except COMPOSE_ERRORS as err:
            return clean_hydra_message(err)
        except AccelError as err:
            return str(err).splitlines()[0]
        return None


def _runs_of_valid(batch: list, problems: list) -> list:
    """The valid jobs of a batch as runs of neighbours (start, jobs), so each keeps its number."""
    runs, start = [], None
    for index, problem in enumerate([*problems, "end"]):
        if problem is None and start is None:
            start = index
        elif problem is not None and start is not None:
            runs.append((start, batch[start:index]))
            start = None
    return runs


def _failed(value: Any) -> bool:
    return getattr(value, "error", None) is not None


@dataclass
class _SweeperConf:
    _target_: str = "hydra_plugins.accel_sweep.EveryJobSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict] = None


ConfigStore.instance().store(group="hydra/sweeper", name="accel", node=_SweeperConf, provider="accel")
