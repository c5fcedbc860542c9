"""What a run can name: recipes, model families, config group options and strategies (`python -m accel.list`,
`python -m accel --help`)."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import accel.strategies  # noqa: F401  every strategy registered
from accel import registry, resources
from accel.families import FAMILIES


def _recipe_summary(path: Path) -> str:
    """A recipe file's leading comment, as one paragraph."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(lines)


def _entry(name: str, text: str, width: int) -> str:
    indent = " " * 28
    body = textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent) if text else ""
    return f"  {name:<25} {body.lstrip()}"


def group_options(group: str) -> list[str]:
    """The options of a config group: its YAML files, and for a stage every registered strategy."""
    shipped = {p.stem for p in (resources.conf_dir() / group).glob("*.yaml")}
    return sorted(shipped | (set(registry.names(group)) if group in registry.STAGES else set()))


def overview() -> str:
    """Recipes (users' folders first: they take precedence), group options and strategies."""
    width = min(shutil.get_terminal_size((100, 20)).columns, 110)
    out = ["Recipes (recipe=NAME):"]
    for folder in [*resources.user_recipe_dirs(), resources.recipes_dir()]:
        out += [_entry(p.stem, _recipe_summary(p), width) for p in sorted(folder.glob("*.yaml"))]
    out += ["", "Config groups (GROUP=OPTION):"]
    for group in ("model", *registry.STAGES):
        out.append(_entry(group, ", ".join(group_options(group)), width))
    out += ["", "Model families (model=OPTION; the pipeline classes each covers, its main one first):"]
    for name, family in sorted(FAMILIES.items()):
        options = ", ".join(sorted(p.stem for p in (resources.conf_dir() / "model").glob("*.yaml")
                                   if f"architecture: {name}\n" in p.read_text()))
        published = ", ".join(sorted(family.adapter.teacache_published)) or "none (python -m accel.calibrate)"
        text = (f"{family.adapter.denoiser_class} in {', '.join(family.pipelines)}; options: {options}; "
                f"TeaCache polynomials (cache.published=): {published}")
        out.append(_entry(name, text, width))
    out += ["", "Strategies, in the order apply runs their stages:"]
    for strategy in registry.strategies():
        if strategy.name != "none":
            summary = strategy.doc.split("\n\n")[0].replace("\n", " ")
            out.append(_entry(f"{strategy.stage}={strategy.name}", summary, width))
    return "\n".join(out)
