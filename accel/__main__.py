"""`python -m accel recipe=NAME [overrides...]`: the main job under Hydra (run folders, `--cfg job`, `-m` sweeps)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from accel import resources
from accel.config import setup, validate
from accel.errors import AccelError

setup()


@hydra.main(version_base="1.3", config_path=str(resources.conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from accel.job import run_job
    from accel.report import summary_table

    runtime = HydraConfig.get().runtime
    run_dir = Path(runtime.output_dir)
    try:
        validate(cfg)
        report = run_job(cfg, run_dir, dict(runtime.choices))
    except AccelError as err:
        print(f"accel: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"accel: run folder {run_dir}")
    print(summary_table(report))


if __name__ == "__main__":
    main()
