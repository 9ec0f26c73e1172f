"""Job configs: frozen dataclasses made of section dataclasses, loaded preset -> YAML -> CLI.

Each job defines ``@dataclass(frozen=True) class XConfig`` whose fields are section dataclasses,
each validating itself in ``__post_init__``. ``load_config(preset(), yaml_path, ["optim.lr=1e-4"])``
applies a YAML file and then ``section.field=value`` overrides (values parsed as YAML scalars)
and re-validates; unknown keys are errors, never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


def to_dict(cfg) -> dict:
    """A config as nested plain dicts (for YAML dumps and run manifests)."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a clear error."""
    origin = typing.get_origin(hint)
    try:
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            return tuple(_coerce(v, args[0] if args else Any, where) for v in value)
        if hint is float and not isinstance(value, bool):
            return float(value)  # YAML reads "4e-4" as a string
        if hint is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is bool and not isinstance(value, bool):
            raise ValueError
        if hint is str and not isinstance(value, str):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {where!r} expects {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def merge(cfg, updates: dict, where: str = ""):
    """A copy of dataclass ``cfg`` with nested ``updates`` applied; unknown keys raise ValueError."""
    if not isinstance(updates, dict):
        raise ValueError(f"config section {where or '<root>'} must be a mapping, got {updates!r}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in updates.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"unknown config key {path!r}; known here: {', '.join(fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, path)
        else:
            changes[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: list[str]) -> dict:
    """["optim.lr=1e-4", "run.name=x"] -> {"optim": {"lr": 1e-4}, "run": {"name": "x"}}."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_config(preset, yaml_path: str | Path | None = None, overrides: list[str] | None = None):
    """Preset, then the YAML file, then CLI overrides; every step re-validated."""
    cfg = preset
    if yaml_path:
        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        cfg = merge(cfg, data)
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides))
    return cfg


def check(cond: bool, message: str) -> None:
    """Raise ValueError(message) unless cond: the validation idiom of every section."""
    if not cond:
        raise ValueError(message)


def describe(cfg, prefix: str = "") -> list[str]:
    """One line per config field: ``section.key = value  (help)``, the help from the field's
    ``metadata={"help": ...}``; nested sections are walked."""
    lines = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines += describe(value, key + ".")
        else:
            help_ = f.metadata.get("help", "")
            lines.append(f"  {key} = {value!r}" + (f"  ({help_})" if help_ else ""))
    return lines


def job_parser(description: str, presets: dict) -> argparse.ArgumentParser:
    """The command line every job shares: ``--preset``, ``--config FILE.yaml`` and trailing
    ``section.key=value`` overrides (jobs add their own options to it). ``--help`` lists every config
    key with its value in the first preset and its help."""
    first = next(iter(presets))
    epilog = f"config keys (values of --preset {first}):\n" + "\n".join(describe(presets[first]()))
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shapes_cpu", choices=sorted(presets), help="starting config")
    parser.add_argument("--config", help="YAML file applied over the preset")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied last")
    return parser
