"""Registry of toy-lab recipes: method name -> function(lab, cfg, num_steps) -> TrainedStudent.

A recipe builds a method on the lab's teacher, trains it with the generic loop and returns the
student with its inference step list and sampler. Recipes live in modules named
``megadistill/toylab/recipes_*.py`` which register themselves with ``@register_recipe(name)``;
``known_recipes()`` imports every such module, so adding a method to the lab is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict

Recipe = Callable[..., "TrainedStudent"]  # noqa: F821 (lab.TrainedStudent; avoid an import cycle)

_RECIPES: Dict[str, Recipe] = {}
_LOADED = False


def register_recipe(name: str) -> Callable[[Recipe], Recipe]:
    def deco(fn: Recipe) -> Recipe:
        if name in _RECIPES and _RECIPES[name] is not fn:
            raise ValueError(f"toy-lab recipe {name!r} registered twice")
        _RECIPES[name] = fn
        return fn

    return deco


def _load_recipe_modules() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("recipes_"):
            importlib.import_module(f"{__package__}.{info.name}")


def known_recipes() -> Dict[str, Recipe]:
    _load_recipe_modules()
    return dict(_RECIPES)


def get_recipe(name: str) -> Recipe:
    recipes = known_recipes()
    if name not in recipes:
        raise ValueError(f"unknown toy-lab method {name!r}; known: {sorted(recipes)}")
    return recipes[name]
