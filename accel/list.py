"""`python -m accel.list`: the recipes, config group options and strategies a run can name."""
from __future__ import annotations

from accel import registry, resources
from accel.config import setup


def main() -> None:
    setup()
    print("recipes (recipe=NAME):")
    for folder in [resources.recipes_dir(), *resources.user_recipe_dirs()]:
        for path in sorted(folder.glob("*.yaml")):
            summary = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
            print(f"  {path.stem:<24} {summary}")
    print("\nconfig groups (GROUP=OPTION):")
    for group in sorted(p for p in resources.conf_dir().iterdir() if p.is_dir()):
        print(f"  {group.name + ':':<12} {', '.join(sorted(p.stem for p in group.glob('*.yaml')))}")
    print("\nstrategies, in the order apply runs their stages:")
    for strategy in registry.all_strategies():
        if strategy.name != "none":
            print(f"  {strategy.stage + '/' + strategy.name:<24} {strategy.doc.splitlines()[0] if strategy.doc else ''}")


if __name__ == "__main__":
    main()
