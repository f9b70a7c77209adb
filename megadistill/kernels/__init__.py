"""Triton kernels and their torch reference twins.

The sources live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py``: a
top-level package named ``kernels`` would shadow Hugging Face's ``kernels`` (a dependency of
transformers) whenever the repository root is on ``sys.path``. This package adds that folder to its
``__path__``, so ``megadistill.kernels.<module>`` imports a module of ``kernels/``.
"""
from pathlib import Path as _Path

_SOURCES = _Path(__file__).resolve().parents[2] / "kernels"
if _SOURCES.is_dir() and str(_SOURCES) not in __path__:
    __path__.append(str(_SOURCES))
