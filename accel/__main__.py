"""`python -m accel recipe=NAME [overrides...]`: the main job under Hydra (run folders, `--cfg job`, `-m` sweeps)."""
from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from accel import cli


def job(cfg: DictConfig, run_dir: Path) -> None:
    from accel.job import run_job
    from accel.report import summary_table

    from accel.parallel.mesh import launched_rank

    report = run_job(cfg, run_dir)
    if launched_rank() != 0:  # other ranks ran in a scratch folder; rank 0 reports
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    print(f"accel: run folder {run_dir}")
    print(summary_table(report))


def main() -> None:
    from accel import doctor

    cli.main(job, doctor.check)


if __name__ == "__main__":
    main()
