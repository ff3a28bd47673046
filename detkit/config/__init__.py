"""YAML configs with inheritance, ``key=value`` overrides and typed validation.

A config file may name parent files under ``_base_`` (a path or a list of paths,
relative to the file). Parents are deep-merged in order, then the file itself on
top. Command-line overrides (``train.max_iters=100``) are applied last; values
are parsed as YAML scalars or lists. The result is validated against
:mod:`detkit.config.schema`: an unknown key names the key and the nearest valid
one, a wrong type names the key and the expected type.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from .schema import ClassificationConfig, Config, DetectionConfig

__all__ = [
    "ConfigError",
    "ClassificationConfig",
    "Config",
    "DetectionConfig",
    "load_config",
    "config_from_dict",
    "save_config",
    "merge_dicts",
    "parse_overrides",
]

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config file, key or value is invalid. The message is one line that says what to fix."""


def merge_dicts(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``. Dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular _base_ inheritance through {' -> '.join(map(str, _seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = merge_dicts(merged, _read_yaml(path.parent / b, _seen + (path,)))
    return merge_dicts(merged, data)


def parse_overrides(overrides: Iterable[str]) -> dict:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict, values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_iters=100)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key; write dotted keys like train.max_iters=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value {raw!r} is not a valid YAML scalar or list") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def _model_at(root: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    model: Any = root
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _format_error(root: type[BaseModel], err: ValidationError, source: str) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            valid = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else ""
            if not close and valid:
                hint = f"; valid keys here: {', '.join(valid)}"
            msgs.append(f"unknown config key {key!r}{hint}")
        else:
            parent = _model_at(root, loc[:-1])
            expected = ""
            if parent is not None and loc and str(loc[-1]) in parent.model_fields:
                ann = parent.model_fields[str(loc[-1])].annotation
                expected = f" (expected {getattr(ann, '__name__', None) or str(ann).replace('typing.', '')})"
            got = e.get("input")
            msgs.append(f"config key {key!r}: {e['msg']}{expected}, got {got!r}")
    return f"{source}: " + "; ".join(msgs)


def config_from_dict(data: dict, source: str = "config") -> Config:
    """Validate a plain dict into a typed config (detection unless ``task: classification``)."""
    task = data.get("task", "detection")
    roots = {"detection": DetectionConfig, "classification": ClassificationConfig}
    if task not in roots:
        raise ConfigError(f"{source}: config key 'task' must be one of {sorted(roots)}, got {task!r}")
    root = roots[task]
    try:
        return root.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(root, e, source)) from None


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config, resolve ``_base_`` inheritance, apply overrides and validate.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings with dotted keys, e.g. ``["train.max_iters=100"]``.

    Returns:
        a :class:`DetectionConfig` or :class:`ClassificationConfig`.

    Raises:
        ConfigError: with a one-line message naming the file, key or value at fault.
    """
    data = _read_yaml(Path(path))
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
    return config_from_dict(data, source=str(path))


def config_to_dict(cfg: Config) -> dict:
    """The fully resolved config as plain Python types (tuples become lists)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write the fully resolved config as YAML; :func:`load_config` reads it back identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
