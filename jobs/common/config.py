"""Typed job configs: YAML file (any fsspec URL) + dotted `key=value` overrides -> pydantic model.

Every job validates its whole config here, before any Ray work starts, so a typo costs
seconds, not a cluster allocation. Unknown keys are rejected by their dotted name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from jobs.common.errors import BadInput

Config = TypeVar("Config", bound=BaseModel)


class ConfigError(BadInput):
    """A config that cannot run; the message names the offending key(s)."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(url: str) -> dict[str, Any]:
    try:
        with fsspec.open(url, "rt") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {url}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {url} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {url} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, 1e-4, [3,6], null)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {prefix} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {error}") from error


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        else:  # a model-level check names its keys itself
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message}" if item["loc"] else message)
    return problems


def build_config(cls: type[Config], data: dict[str, Any], source: str = "config") -> Config:
    """`data` checked whole against `cls`: every bad key is named, on the one line when there is one."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        problems = _describe(error)
        listed = problems[0] if len(problems) == 1 else "".join(f"\n  {problem}" for problem in problems)
        raise ConfigError(f"invalid {source}: {listed}") from None


def load_config(cls: type[Config], path: str | None, overrides: Sequence[str] = ()) -> Config:
    data = read_yaml(path) if path else {}
    for override in overrides:
        apply_override(data, override)
    return build_config(cls, data, source=path or "config")


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The config as its YAML spells it (a field's alias, where it has one)."""
    return config.model_dump(mode="json", by_alias=True)


def config_to_yaml(config: BaseModel | dict[str, Any]) -> str:
    """A config as the YAML a job reads back (keys in schema order)."""
    data = config_to_dict(config) if isinstance(config, BaseModel) else config
    return yaml.safe_dump(data, sort_keys=False)


def config_hash(config: BaseModel | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the resolved config."""
    data = config_to_dict(config) if isinstance(config, BaseModel) else config
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and Tune search spaces use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
