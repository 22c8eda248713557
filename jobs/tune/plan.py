"""A tune job planned and checked on the driver before any Ray work: the base and trial
pretraining configs, the dimensions, and every candidate value tried against the model."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from jobs.common.config import (
    ConfigError,
    apply_override,
    build_config,
    flatten,
    read_yaml,
)
from jobs.common.storage import absolute, absolute_sqlite, join
from jobs.pretrain import PretrainConfig, validate
from jobs.tune.config import TuneConfig
from jobs.tune.space import MAX_COMBINATIONS_CHECKED, Dimension, build_space
from model.config import ModelConfig


def override(key: str, value: Any) -> str:
    """`key=value` for apply_override, the value written as YAML so that it parses back to itself."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return f"{key}=" + text.removesuffix("...\n").strip()  # a scalar's document ends with "..."


def with_values(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    applied = copy.deepcopy(data)
    for key, value in values.items():
        apply_override(applied, override(key, value))
    return applied


def checked(data: dict[str, Any], source: str) -> PretrainConfig:
    config = build_config(PretrainConfig, data, source=source)
    validate(config)
    return config


@dataclass
class TunePlan:
    """Everything a trial needs, built and checked on the driver before any Ray work."""

    config: TuneConfig
    base: dict[str, Any]  # the base pretraining config (file + pretrain.overrides)
    trial_base: dict[str, Any]  # what every trial runs before its sampled values
    dims: list[Dimension]
    points: list[dict[str, Any]]  # points_to_evaluate as Optuna stores them
    base_config: PretrainConfig  # `base` and `trial_base` as checked
    trial_base_config: PretrainConfig
    model: ModelConfig  # the base config's model
    home: str = field(default_factory=lambda: absolute(""))  # where the driver resolves relative paths
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def study_url(self) -> str:
        """The Optuna study's SQLAlchemy URL (a relative SQLite path made absolute)."""
        return absolute_sqlite(self.config.search.study_storage)

    @property
    def experiment_url(self) -> str:
        return join(absolute(self.config.storage), self.name)

    def values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Sampled parameters (by name) -> pretraining values (by dotted key)."""
        return {dim.key: dim.value(params[dim.name]) for dim in self.dims}

    def trial_config(self, params: Mapping[str, Any], trial_id: str) -> PretrainConfig:
        data = with_values(self.trial_base, {
            **self.values(params),
            "run_name": f"{self.name}-{trial_id}",
            # Beside the Tune experiment, so that fresh=true removes it too.
            "checkpoint.storage": join(self.experiment_url, "train"),
            "tracking.uri": self.tracking_uri,
        })
        return checked(data, f"trial {trial_id}")

    def best_config(self, params: Mapping[str, Any]) -> PretrainConfig:
        """The base config with a trial's values: ready for a full run."""
        return checked(with_values(self.base, {**self.values(params), "run_name": f"{self.name}-best"}),
                       "best config")


def invalid_values(dims: list[Dimension], bases: tuple[dict[str, Any], ...]) -> list[str]:
    """Candidate values that make an invalid trial or best config: each value alone, then each
    pair (a window must fit the largest n-gram size searched beside it), then all together if
    that is not too many. Stops at the first of these levels that finds any."""
    for size in sorted({1, 2, len(dims)}):
        problems = []
        for subset in itertools.combinations(dims, size):
            grid = [dim.candidates() for dim in subset]
            if math.prod(len(candidates) for candidates in grid) > MAX_COMBINATIONS_CHECKED:
                continue
            for combination in itertools.product(*grid):
                values = {dim.key: value for dim, (_, value) in zip(subset, combination, strict=True)}
                for data in bases:
                    try:
                        checked(with_values(data, values), "config")
                    except ConfigError as error:
                        named = " with ".join(f"{dim.source}={text}"
                                              for dim, (text, _) in zip(subset, combination, strict=True))
                        problems.append(f"{named}: {error}")
                        break
        if problems:
            return problems
    return []


def make_plan(config: TuneConfig) -> TunePlan:
    """Build the base and trial configs and check every candidate value against them, before
    any Ray work: a window below the largest n-gram or a layer beyond the model fails here, with
    every bad value named."""
    base = read_yaml(config.pretrain.config) if config.pretrain.config else {}
    base = with_values(base, flatten(config.pretrain.overrides))
    source = config.pretrain.config or "pretraining defaults"
    base_config = checked(base, f"{source} + pretrain.overrides")
    model = validate(base_config)
    trial_base = with_values(base, {
        **flatten(config.trial.overrides),
        "train.max_steps": config.trial.max_steps,
        "train.eval_every": config.trial.eval_every,
        "tracking.registered_model": None,  # the best config registers its model, not every trial
    })
    trial_base_config = checked(trial_base, "trial config (base + trial.overrides)")
    dims = build_space(config.space, model.num_layers)

    problems = invalid_values(dims, (trial_base, base))
    if len(problems) == 1:
        raise ConfigError(f"the search space names a value the model cannot take: {problems[0]}")
    if problems:
        shown = "\n".join(f"  {problem}" for problem in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(f"the search space names values the model cannot take:\n{shown}{more}")

    points, names = [], {dim.name for dim in dims}
    for index, point in enumerate(config.search.points_to_evaluate):
        if set(point) != names:
            raise ConfigError(f"search.points_to_evaluate[{index}] must name exactly the searched settings "
                              f"{sorted(names)}, not {sorted(point)}")
        try:
            points.append({dim.name: dim.encode(point[dim.name]) for dim in dims})
        except ValueError as error:
            raise ConfigError(f"search.points_to_evaluate[{index}]: {error}") from None
    return TunePlan(config, base, trial_base, dims, points, base_config, trial_base_config, model)
