"""`python -m accel recipe=NAME [overrides...]`: the main job under Hydra (run folders, `--cfg job`, `-m` sweeps)."""
from accel import cli, doctor
from accel.job import main_task


def main() -> None:
    cli.main(main_task, doctor.check)


if __name__ == "__main__":
    main()
