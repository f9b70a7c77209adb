"""Typed experiment configs: dataclasses loaded from YAML, with ``a.b=value`` command-line overrides.

Every section is a plain dataclass with defaults; ``__post_init__`` validates values. The loader is
strict so that a typo costs seconds, not a cluster allocation: an unknown key, a value of the wrong type
or a missing file raises ``ConfigError`` naming the dotted key (or file) before any work starts.

    cfg = load_config(ExperimentConfig, "configs/x.yaml", ["toylab.seed=3", "run.output_dir=out"])
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the dotted key or the file."""


_NONE_TYPE = type(None)
_SCI_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown_key_error(cls, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{_join(where, key)}'{hint} (valid keys: {', '.join(names)})")


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp`` and return it converted (int -> float only)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None:
            if _NONE_TYPE in args:
                return None
            raise ConfigError(f"config key '{where}' must not be null")
        errors = []
        for arg in args:
            if arg is _NONE_TYPE:
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{where}': value {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{where}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"config key '{where}' must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {type(value).__name__}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, where): _coerce(v, v_tp, _join(where, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' is a section and needs a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); accept the form everyone types.
        if isinstance(value, str) and _SCI_FLOAT.match(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{where}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a nested dict, strictly: unknown keys and wrong types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config section '{where or '<root>'}': {e}") from e


def check_keys(cls, data: Any, where: str) -> None:
    """The keys of a section that is kept but not built (e.g. a method not selected) against dataclass
    ``cls``, recursively, with ``from_dict``'s errors."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(cls, key, where)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            check_keys(hints[key], value, _join(where, key))


def to_dict(obj) -> Any:
    """Plain nested dict/list form of a config (for YAML printing and checkpoint metadata). A section
    that prints differently from its fields (only the selected method's section) has ``config_dict()``."""
    if hasattr(obj, "config_dict"):
        return obj.config_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML, so 3 is int, 1e-4 float, [1,2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(cls, data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` overrides to a raw dict, checking each path against the schema of ``cls``."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node_cls, node = cls, data
        for depth, key in enumerate(path):
            where = ".".join(path[: depth + 1])
            names = {f.name: f for f in dataclasses.fields(node_cls)}
            if key not in names:
                raise _unknown_key_error(node_cls, key, ".".join(path[:depth]))
            if depth == len(path) - 1:
                node[key] = value
                break
            sub_tp = get_type_hints(node_cls)[key]
            if get_origin(sub_tp) in (Union, types.UnionType):
                sub_tp = next(a for a in get_args(sub_tp) if a is not _NONE_TYPE)
            if sub_tp is Any:  # a section typed later (e.g. by the model family): its own class checks the keys
                _set_path(node, path[depth:], value)
                break
            if not dataclasses.is_dataclass(sub_tp):
                raise ConfigError(f"override '{text}': '{where}' is not a section")
            child = node.get(key)
            child = dict(child) if isinstance(child, dict) else {}
            node[key] = child
            node_cls, node = sub_tp, child
    return data


def _set_path(node: dict, path: Sequence[str], value: Any) -> None:
    """``node[path[0]][path[1]]... = value``, creating (copies of) the mappings on the way."""
    for key in path[:-1]:
        child = node.get(key)
        child = dict(child) if isinstance(child, dict) else {}
        node[key] = child
        node = child
    node[path[-1]] = value


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge_onto(base: dict, data: dict) -> dict:
    """``data`` laid over ``base`` key by key, recursing into mappings present in both."""
    out = dict(base)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_onto(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls, path: Optional[str] = None, overrides: Sequence[str] = ()):
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides, strictly.

    The file and overrides are laid over the full default tree ``to_dict(cls())``: a section given in
    part keeps its parent's defaults (a ``default_factory`` that differs from the section class's own
    defaults) for the keys it leaves out, instead of falling back to the section class's defaults.
    A class whose defaults depend on what the user chose (``ExperimentConfig``: the model family
    types the ``model``, ``data`` and ``eval`` sections) gives them by ``config_defaults(data)``, called
    with the file's tree and the overrides applied.
    """
    user = read_yaml(path) if path else {}
    if hasattr(cls, "config_defaults"):
        defaults = cls.config_defaults(apply_overrides(cls, user, overrides))
    else:
        defaults = to_dict(cls())
    data = apply_overrides(cls, merge_onto(defaults, user), overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path:
            origin = f"{path} + command-line overrides" if overrides else path
            raise ConfigError(f"{origin}: {e}") from e
        raise


def dump_config(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
