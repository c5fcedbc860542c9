"""`python -m accel.list`: the recipes, model families, config group options and strategies a run can name."""
from accel.catalog import overview
from accel.errors import one_line_errors


def main() -> None:
    print(overview())


if __name__ == "__main__":
    one_line_errors(main)
