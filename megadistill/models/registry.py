"""The model families ``model.family`` can name: one line per family (``module:class``), imported
on first use. ``model.family`` may also be a ``module:class`` or ``path/to/file.py:class`` path (a
family outside this package, e.g. a user's own model), or a name added at run time with
``register_family``.

    family = get_family("wan")        # -> the WanFamily instance
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from typing import Dict, List

from megadistill.models.family import ModelFamily

FAMILIES: Dict[str, str] = {
    "wan": "megadistill.models.wan.family:WanFamily",
    "toy": "megadistill.models.toy.family:ToyFamily",
}
_loaded: Dict[str, ModelFamily] = {}
DEFAULT_FAMILY = "wan"  # what ``model.family`` is when a config leaves it out (the embedded demo is Wan)
# What the config of the single-family releases had, and where it went (the message of a refused key).
MOVED_SECTIONS = {
    "wan": "model: {family: wan, teacher, generator, critic, discriminator_layers}; "
           "data: {latent_shape, prompts, text_encoder, negative_prompt, first_frames, ode_pairs}; "
           "rollout: {...}; eval: {...} (wan.X.Y -> model.X.Y for teacher / generator / critic / "
           "discriminator_layers, data.Y for wan.latent_shape and wan.data.Y, rollout.Y, eval.Y)",
}
MOVED_JOBS = {"wan": "job: distill with model.family: wan", "toylab": "job: distill with model.family: toy"}


def register_family(name: str, family: ModelFamily) -> None:
    """Make ``family`` reachable as ``model.family: <name>`` in this process."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family({name!r}): expected a ModelFamily instance, got {type(family).__name__}")
    _loaded[name] = family


def family_names() -> List[str]:
    return sorted(set(FAMILIES) | set(_loaded))


def get_family(name: str) -> ModelFamily:
    """The family ``name`` names; ValueError listing the known ones otherwise."""
    if name in _loaded:
        return _loaded[name]
    target = FAMILIES.get(name, name if ":" in name else None)
    if target is None:
        raise ValueError(f"unknown model family {name!r}; known: {family_names()} (or a 'module:Class' path)")
    module_name, _, attr = target.rpartition(":")
    try:
        cls = getattr(_import(module_name), attr)
    except (ImportError, AttributeError, OSError) as e:
        raise ValueError(f"model family {name!r}: cannot import {target} ({e})") from e
    family = cls() if isinstance(cls, type) else cls
    if not isinstance(family, ModelFamily):
        raise ValueError(f"model family {name!r}: {target} is not a ModelFamily")
    _loaded[name] = family
    return family


def _import(module_name: str):
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location("megadistill_family_" + re.sub(r"\W", "_", module_name), module_name)
    if spec is None:
        raise ImportError(f"not a Python file: {module_name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
