"""accel's sweeper and launcher for Hydra (Hydra loads plugins from this namespace only).

They keep a sweep going past a job that fails: Hydra's basic sweeper composes every job up front
and stops the whole sweep at the first bad override, before anything runs.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from omegaconf import open_dict

class EveryJobSweeper(BasicSweeper):
    """Hydra's basic sweeper, without composing every job up front: one job's bad override would stop
    the whole sweep before anything runs. Each job is composed when it is launched instead."""

    def validate_batch_is_legal(self, batch) -> None:
        pass


class EveryJobLauncher(BasicLauncher):
    """Hydra's basic launcher, where a job whose overrides do not compose fails alone."""

    def launch(self, job_overrides, initial_job_idx: int):
        from accel.cli import COMPOSE_ERRORS, record_failure
        from accel.config import clean_hydra_message
        from accel.errors import AccelError

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        runs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except COMPOSE_ERRORS as err:
                record_failure(AccelError(clean_hydra_message(err)), (idx, list(overrides)))
                runs.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED))
                continue
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        return runs


@dataclass
class _SweeperConf:
    _target_: str = "hydra_plugins.accel_sweep.EveryJobSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict] = None


@dataclass
class _LauncherConf:
    _target_: str = "hydra_plugins.accel_sweep.EveryJobLauncher"


ConfigStore.instance().store(group="hydra/sweeper", name="accel", node=_SweeperConf, provider="accel")
ConfigStore.instance().store(group="hydra/launcher", name="accel", node=_LauncherConf, provider="accel")
