"""The repository root, and files that are not importable modules (tools/*.py, launch/*.py, test
workers) loaded as modules."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Union

ROOT = Path(__file__).resolve().parents[2]


def load_module(name: str, path: Union[str, Path]) -> ModuleType:
    """The module of the Python file ``path``, registered as ``name`` (dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ImportError(f"not a Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
