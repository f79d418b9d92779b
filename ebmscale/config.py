"""Typed configuration: a dataclass tree (its schema: :mod:`ebmscale.config_schema`, re-exported
here), YAML recipes, dotted command-line overrides.

Every field has a default and a one-line help text (``metadata["help"]``). Values are checked
for type, choice and range when loaded, and cross-field rules are checked by :func:`validate`
(the rules: :mod:`ebmscale.config_rules`), so a bad config fails before any work starts with one
line naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import yaml

# The schema (dataclasses, field helper, shared choice lists) is its own module; re-exported here.
from ebmscale.config_schema import (  # noqa: F401
    IMAGE_DATASETS, LSD_CRITIC_ARCHS, OBJECTIVE_KINDS, TOY_DATASETS, BufferConfig, Config, ConfigError, DataConfig,
    ModelConfig, ObjectiveConfig, OptimConfig, SamplerConfig, TrainConfig, _f,
)


# --------------------------------------------------------------------------- loading

def _check_value(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Type-check (with int->float widening) and range-check one value; return it normalised."""
    typ = f.type if not isinstance(f.type, str) else eval(f.type, {"list": list})  # noqa: S307 - own annotations
    meta = f.metadata
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if isinstance(value, bool) and meta.get("choices") and "true" in meta["choices"]:
            value = "true" if value else "false"  # YAML reads a bare true/false as a bool
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    elif typ is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"config key '{key}' must be a list of numbers, got {value!r}")
        value = list(value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"config key '{key}' must be {op} {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"config key '{key}' must be <= {hi}, got {value!r}")
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Recursively set fields of dataclass ``obj`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{key}' (known here: {known})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _check_value(key, fields[name], value))


def _set_dotted(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}'")
        obj = getattr(obj, p)
    nested: dict = value
    for p in reversed(parts[1:]):
        nested = {p: nested}
    _apply(cfg, {parts[0]: nested} if len(parts) > 1 else {parts[0]: value})


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as YAML (so 1e-4, true, [0, 0.9] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip():
        # YAML reads '1e-4' as a string; accept scientific notation without a dot.
        try:
            value = float(raw) if any(c in raw.lower() for c in ".e") else int(raw)
        except ValueError:
            value = raw
    return key, value


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and dotted overrides."""
    cfg = Config()
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
        _apply(cfg, data)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """``cfg`` with dotted ``key=value`` overrides applied (in place), then validated."""
    for text in overrides:
        _set_dotted(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks (the rules: :mod:`ebmscale.config_rules`); each failure names the key to change."""
    from ebmscale.config_rules import check  # imported here: the rules import this module

    check(cfg)


def class_conditional_chains(cfg: Config) -> bool:
    """Whether the sampler runs class-conditional chains (a conditional energy, or JEM's p(x, y)
    term): their labels come from the data batch and the buffer is split per class."""
    return cfg.model.conditional or (cfg.objective.kind == "jem" and cfg.objective.pxy_weight > 0)


def tracker_names(t: "TrainConfig") -> list[str]:
    """The trackers a run feeds: ``train.trackers`` in order, without duplicates, less tensorboard
    when ``train.tensorboard`` is false."""
    names: list[str] = []
    for name in (n.strip() for n in t.trackers.split(",")):
        if name and name not in names and (name != "tensorboard" or t.tensorboard):
            names.append(name)
    return names


# --------------------------------------------------------------------------- dumping

def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild and validate a Config from :func:`to_dict` output (e.g. a checkpoint's copy)."""
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, sections in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
