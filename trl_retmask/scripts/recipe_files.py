"""Where the recipes live: `recipes/<name>.yaml` (a model's training defaults) and `recipes/accelerate/<name>.yaml`
(launch configs), found inside the installed package first, then in the checkout; a new recipe is a new file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import load_yaml

RECIPE_DIRS = (Path(__file__).resolve().parents[1] / "recipes", Path(__file__).resolve().parents[2] / "recipes")
"""Where recipe YAMLs are found: inside the installed package (the wheel maps `recipes/` there), then the checkout."""


def recipe_path(name_or_path) -> Path:
    """The YAML of a recipe name (a `<name>.yaml` of `recipes/`, see `recipe_names`) or a YAML file path."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file {str(path)!r} does not exist.")
        return path
    for folder in RECIPE_DIRS:
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    raise ValueError(
        f"Unknown recipe {str(name_or_path)!r}; choose one of {', '.join(recipe_names())} or give a "
        "YAML file of defaults."
    )


def accelerate_config_path(name) -> Path | None:
    """A shipped accelerate config (`recipes/accelerate/<name>.yaml`: single_gpu, multi_gpu, zero1, zero2, zero3,
    fsdp2)."""
    for folder in RECIPE_DIRS:
        if (folder / "accelerate" / f"{name}.yaml").is_file():
            return folder / "accelerate" / f"{name}.yaml"
    return None


def recipe_names() -> list[str]:
    """The shipped recipes: the YAML files of `recipes/` (a new model's recipe is a new file there)."""
    folder = next((d for d in RECIPE_DIRS if d.is_dir()), None)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def recipe_defaults(name_or_path) -> dict[str, Any]:
    """The defaults a recipe sets (its YAML mapping)."""
    path = recipe_path(name_or_path)
    defaults = load_yaml(path, "Recipe file") or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"Recipe file {path} must hold a YAML mapping of argument names to values.")
    return defaults
