"""YAML configs with inheritance, ``key=value`` overrides and typed validation.

A config file may name parent files under ``_base_`` (a path or a list of paths,
relative to the file). Parents are deep-merged in order, then the file itself on
top. Command-line overrides (``train.max_iters=100``) are applied last; values
are parsed as YAML scalars or lists. The result is validated against
:mod:`detkit.config.schema`: an unknown key names the key and the nearest valid
one, a wrong value names the config key (never a pydantic-internal location such as a
union member or list index) and the expected type in words (``int or list[int]``,
``one of 'BN', 'GN'``, ``list of 3 floats``), an unknown architecture the nearest valid name.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import DetkitError
from ..fileio import write_text_atomic
from .schema import ClassificationConfig, Config, DetectionConfig

__all__ = [
    "ConfigError",
    "ClassificationConfig",
    "Config",
    "DetectionConfig",
    "load_config",
    "load_detection_config",
    "load_classification_config",
    "config_from_dict",
    "save_config",
    "merge_dicts",
    "parse_overrides",
]

BASE_KEY = "_base_"
_UNION_ORIGINS = (Union, types.UnionType)


class ConfigError(DetkitError, ValueError):
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


def _model_in(ann: Any) -> Optional[type[BaseModel]]:
    """The pydantic model class an annotation holds: itself, or the model member of an Optional/Union."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if get_origin(ann) in _UNION_ORIGINS:
        for arg in get_args(ann):
            model = _model_in(arg)
            if model is not None:
                return model
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The model class of the config section at ``loc`` (unwrapping Optional/Union), or None."""
    model: Any = root
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    return model


def _walk(root: type[BaseModel], loc: tuple) -> tuple[tuple[str, ...], Any, Optional[type[BaseModel]]]:
    """Map a pydantic error location onto the config key it is about.

    Returns ``(key parts, annotation of the last key, model class at the last key or None)``.
    Parts that are not config keys are dropped: union-member tags pydantic inserts
    (``int``, ``list[int]``) and list/tuple positions inside a value.
    """
    model: Optional[type[BaseModel]] = root
    key: list[str] = []
    ann: Any = None
    for part in loc:
        if model is None:  # inside a plain value (list item, tuple position): the key ends here
            break
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:  # a union-member tag between a key and its section
            continue
        key.append(part)
        ann = field.annotation
        model = _model_in(ann)
    return tuple(key), ann, model


def _type_name(ann: Any) -> str:
    """A readable name for an annotation: ``int or null``, ``one of 'a', 'b'``, ``list of 3 floats``."""
    if ann is None or ann is type(None):
        return "null"
    origin, args = get_origin(ann), get_args(ann)
    if origin in _UNION_ORIGINS:
        members = [a for a in args if a is not type(None)]
        names = [_type_name(a) for a in members] + (["null"] if len(members) < len(args) else [])
        return " or ".join(names)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, set, frozenset) or ann in (list, set, frozenset):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is tuple or ann is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        if args and all(a == args[0] for a in args):
            return f"list of {len(args)} {_type_name(args[0])}s"
        return f"list [{', '.join(_type_name(a) for a in args)}]" if args else "list"
    if origin is dict or ann is dict or _model_in(ann) is not None:
        return "mapping"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


# pydantic error types that mean "this value has the wrong type/shape" (reported as "expected T")
_TYPE_ERRORS = {"missing", "too_short", "too_long", "literal_error", "is_instance_of", "model_type",
                "model_attributes_type", "union_tag_invalid", "union_tag_not_found"}
_MISSING = object()


def _value_at(data: Any, key: tuple[str, ...]) -> Any:
    for part in key:
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _describe(key: tuple[str, ...], ann: Any, errors: list[dict], data: Optional[dict]) -> str:
    """The message for one config key whose value failed validation (possibly several pydantic errors)."""
    name = ".".join(key) or "<root>"
    value = _value_at(data, key) if data is not None else _MISSING
    got = repr(errors[0].get("input") if value is _MISSING else value)
    custom = [e for e in errors if e["type"] == "value_error"]
    if custom:  # a validator's own message (e.g. an unknown architecture) says it all
        return f"config key {name!r}: {str(custom[0]['msg']).removeprefix('Value error, ')}"
    kind = errors[0]["type"]
    if len(errors) == 1 and kind not in _TYPE_ERRORS and not kind.endswith(("_type", "_parsing")):
        msg = str(errors[0]["msg"])  # right type, out of range (e.g. freeze_at=9)
        return f"config key {name!r}: {msg[:1].lower() + msg[1:]}, got {got}"
    expected = _type_name(ann) if key else "mapping"
    return f"config key {name!r}: expected {expected}, got {got}"


def _format_error(root: type[BaseModel], err: ValidationError, source: str, data: Optional[dict] = None) -> str:
    """One ``; ``-separated line with one entry per config key at fault.

    ``data`` (the validated input) lets a message show a key's whole value rather than the
    list item or union member pydantic happened to reject.
    """
    entries: list[Union[str, tuple[str, ...]]] = []  # messages, or keys whose message comes later
    wrong: dict[tuple[str, ...], tuple[Any, list[dict]]] = {}  # key -> (annotation, its errors)
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            parent_key, _, parent = _walk(root, loc[:-1])
            valid = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(parent_key + (close[0],))!r}?" if close else ""
            if not close and valid:
                hint = f"; valid keys here: {', '.join(valid)}"
            entries.append(f"unknown config key {'.'.join(parent_key + (str(loc[-1]),))!r}{hint}")
            continue
        key, ann, _ = _walk(root, loc)
        if key not in wrong:  # a union reports each member's failure: one entry per key
            wrong[key] = (ann, [])
            entries.append(key)
        wrong[key][1].append(e)
    msgs = [x if isinstance(x, str) else _describe(x, *wrong[x], data) for x in entries]
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
        raise ConfigError(_format_error(root, e, source, data)) from None


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config, resolve ``_base_`` inheritance, apply overrides and validate.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings with dotted keys, e.g. ``["train.max_iters=100"]``.

    Returns:
        DetectionConfig or ClassificationConfig: the validated config.

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


def _load_task_config(path: Union[str, os.PathLike], overrides: Sequence[str], kind: type, tool: str,
                      hint: str) -> Config:
    cfg = load_config(path, list(overrides))
    if not isinstance(cfg, kind):
        task = "detection" if kind is DetectionConfig else "classification"
        raise ConfigError(f"--config {path}: task is {cfg.task!r}; {tool} needs a {task} config ({hint})")
    return cfg


def load_detection_config(path: Union[str, os.PathLike], overrides: Sequence[str] = (),
                          tool: str = "this tool") -> DetectionConfig:
    """:func:`load_config`, which must give a detection config; else a one-line :class:`ConfigError` naming ``tool``."""
    return _load_task_config(path, overrides, DetectionConfig, tool, "tools/pretrain_cls.py trains classifiers")


def load_classification_config(path: Union[str, os.PathLike], overrides: Sequence[str] = (),
                               tool: str = "pretrain_cls.py") -> ClassificationConfig:
    """:func:`load_config`, which must give a classification config; else a one-line :class:`ConfigError`."""
    return _load_task_config(path, overrides, ClassificationConfig, tool,
                             "task: classification; tools/train_det.py trains detectors")


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write the fully resolved config as YAML; :func:`load_config` reads it back identically."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
