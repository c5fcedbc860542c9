"""Hydra plumbing that makes `recipe=NAME` find files in `recipes/` and in users' recipe folders.

Hydra looks a group up as a folder of the same name in a search-path root; our recipes live in a
folder called `recipes/` (and users' folders are named freely), so each recipe folder is mounted as
the `recipe` group of its own search-path entry through a small ConfigSource.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

from accel import resources
from accel.recipe import find_code

GROUP = "recipe"


class RecipeFolderSource(FileConfigSource):
    """Exposes the YAML files of one folder as the options of the `recipe` group."""

    @staticmethod
    def scheme() -> str:
        return "accel-recipes"

    def _in_folder(self, config_path: str) -> Optional[str]:
        if config_path == GROUP:
            return ""
        if config_path.startswith(GROUP + "/"):
            return config_path[len(GROUP) + 1 :]
        return None

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._in_folder(config_path)
        if inner is None:
            raise ConfigLoadError(f"Config not found : {config_path}")
        result = super().load_config(inner)
        name = inner.removesuffix(".yaml")
        where = f"{self.path}/{name}.yaml"
        if not result.config and not result.header.get("defaults"):
            raise ConfigLoadError(f"recipe '{name}' ({where}) is empty: a recipe picks group options in its "
                                  "defaults list and sets fields (README: Recipes)")
        # A recipe speaks about the whole config (`cache.…`, `steps`), not about a `recipe` node.
        if result.header.get("package") is None:
            result.header["package"] = "_global_"
        found = find_code(result.config)
        if found is not None:
            raise ConfigLoadError(
                f"recipe '{name}' ({where}): {found}: recipes are shared data and cannot name code to import or "
                "call, nor read the environment or files; write values themselves, and choose strategies by their "
                "registered names (`python -m accel.list` shows them)"
            )
        return result

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        return config_path in ("", GROUP)

    def is_config(self, config_path: str) -> bool:
        inner = self._in_folder(config_path)
        return bool(inner) and super().is_config(inner)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if config_path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if config_path != GROUP or results_filter == ObjectType.GROUP:
            return []
        return sorted(f[: -len(".yaml")] for f in os.listdir(self.path) if f.endswith(".yaml"))


def recipe_folders() -> list[Path]:
    """Where `recipe=NAME` is looked up, first match first: the users' folders (ACCEL_RECIPES, in order),
    then the shipped recipes, so a user's recipe of the same name as a shipped one is the one that runs."""
    return [*resources.user_recipe_dirs(), resources.recipes_dir()]


def recipe_file(name: str) -> tuple[Optional[Path], list[Path]]:
    """The file `recipe=NAME` composes from, and the files of the same name it takes precedence over."""
    found = [folder / f"{name}.yaml" for folder in recipe_folders() if (folder / f"{name}.yaml").is_file()]
    return (found[0], found[1:]) if found else (None, [])


class AccelSearchPath(SearchPathPlugin):
    """Adds the shipped recipes, then every folder named in ACCEL_RECIPES."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in recipe_folders():
            search_path.append("accel", f"accel-recipes://{folder}")


def install() -> None:
    plugins = Plugins.instance()
    plugins.register(RecipeFolderSource)
    plugins.register(AccelSearchPath)
