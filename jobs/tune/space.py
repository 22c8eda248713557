"""The search space: each searched setting as a Dimension (Optuna parameter, pretraining key,
choices or range), from the config's short names and dotted keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from jobs.common.config import (
    ConfigError,
    build_config,
)
from jobs.tune.config import SINGLE_LAYERS, Range, SpaceSection

# Gengram's settings by short name, and the pretraining key each one sets.
GENGRAM_KEYS = {
    "window_size": "model.overrides.gengram.window_size",
    "layers": "model.overrides.gengram_layers",
    "pooling": "model.overrides.gengram.pooling",
    "embed_dim_per_ngram": "model.overrides.gengram.embed_dim_per_ngram",
    "ngram_sizes": "model.overrides.gengram.ngram_sizes",
}
# Keys a search sets itself, or that must be equal in every trial for val losses to compare.
UNSEARCHABLE = ("run_name", "checkpoint.storage", "train.max_steps", "train.eval_every", "train.eval_batches",
                "data.", "tracking.")
# Checking a candidate config takes about 0.2 ms: all combinations of the searched values are
# checked together when there are at most this many (a few seconds), else each value and pair.
MAX_COMBINATIONS_CHECKED = 20_000


def label(value: Any) -> str:
    """How Optuna stores a choice: a string, since it keeps lists and None poorly."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def parse_window(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a window size in bp nor `none`") from None


def parse_ids(value: Any) -> list[int]:
    """3, "3,6,10" or [3, 6, 10] -> [3, 6, 10]."""
    if isinstance(value, int):
        return [value]
    parts = value.split(",") if isinstance(value, str) else value
    try:
        return [int(part) for part in parts]
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a layer id or a comma-separated set of them") from None


def keep(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Dimension:
    """One searched setting: its Optuna parameter name, the pretraining key it sets, and either
    choices (label -> value) or a range."""

    name: str
    key: str
    choices: dict[str, Any] = field(default_factory=dict)
    range: Range | None = None
    parse: Callable[[Any], Any] = keep  # a user's spelling of a value -> the value

    @property
    def source(self) -> str:
        """Where the config names it."""
        return f"space.{self.name}" if self.name in GENGRAM_KEYS else f"space.params.{self.name}"

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.range is None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        low, high, log = self.range.low, self.range.high, self.range.log
        if self.range.integer:
            return optuna.distributions.IntDistribution(int(low), int(high), log=log)
        return optuna.distributions.FloatDistribution(low, high, log=log)

    def value(self, sampled: Any) -> Any:
        """The pretraining value for what Optuna sampled."""
        if self.range is None:
            return self.choices[sampled]
        return int(sampled) if self.range.integer else float(sampled)

    def candidates(self) -> list[tuple[str, Any]]:
        """(label, value) pairs that must all make a valid config: every choice, a range's ends."""
        if self.range is None:
            return list(self.choices.items())
        ends = (self.range.low, self.range.high)
        return [(label(end), self.value(end)) for end in ends]

    def encode(self, value: Any) -> Any:
        """A point to evaluate's value, as Optuna stores it."""
        if self.range is None:
            encoded = label(self.parse(value))
            if encoded not in self.choices:
                raise ValueError(f"{value!r} is not one of the choices {list(self.choices)}")
            return encoded
        if not self.range.low <= float(value) <= self.range.high:
            raise ValueError(f"{value!r} lies outside [{self.range.low}, {self.range.high}]")
        return self.value(value)


def _choices(name: str, values: list[Any], parse: Callable[[Any], Any]) -> dict[str, Any]:
    if not values:
        raise ConfigError(f"space.{name} is an empty list; use null to leave it out of the search")
    choices: dict[str, Any] = {}
    for raw in values:
        try:
            value = parse(raw)
        except ValueError as error:
            raise ConfigError(f"space.{name}: {error}") from None
        choices.setdefault(label(value), value)  # a choice listed twice is one choice
    return choices


def _param_leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """space.params by dotted key, nested or not (a command-line override `space.params.train.lr=...`
    nests, and the later spelling of a key wins); a range ({low, high, ...}) or a list is a leaf."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "low" not in value:
            yield from _param_leaves(value, f"{name}.")
        else:
            yield name, value


def build_space(space: SpaceSection, num_layers: int) -> list[Dimension]:
    """The searched settings, in the order their shorthands and params are written."""
    dims: list[Dimension] = []
    if space.window_size is not None:
        dims.append(Dimension("window_size", GENGRAM_KEYS["window_size"],
                              _choices("window_size", space.window_size, parse_window), parse=parse_window))
    if space.layers is not None:
        expanded: list[Any] = []
        for entry in space.layers:
            expanded.extend(range(1, num_layers + 1) if entry == SINGLE_LAYERS else [entry])
        dims.append(Dimension("layers", GENGRAM_KEYS["layers"], _choices("layers", expanded, parse_ids),
                              parse=parse_ids))
    for name, parse in (("pooling", keep), ("embed_dim_per_ngram", keep), ("ngram_sizes", parse_ids)):
        values = getattr(space, name)
        if values is not None:
            dims.append(Dimension(name, GENGRAM_KEYS[name], _choices(name, values, parse), parse=parse))
    for key, spec in dict(_param_leaves(space.params)).items():
        if isinstance(spec, list):
            dims.append(Dimension(key, key, _choices(f"params.{key}", spec, keep)))
        elif isinstance(spec, Mapping):
            dims.append(Dimension(key, key, range=build_config(Range, dict(spec), source=f"space.params.{key}")))
        else:
            raise ConfigError(f"space.params.{key} must be a list of choices or a range {{low, high}}, "
                              f"not {spec!r}")
    keys = [dim.key for dim in dims]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"space: {key} is searched twice, by its short name and in space.params")
        if any(key == reserved or (reserved.endswith(".") and key.startswith(reserved))
               for reserved in UNSEARCHABLE):
            raise ConfigError(f"space.params.{key}: this key is set by the search itself or must be the same in "
                              "every trial for their val losses to compare")
    if not dims:
        raise ConfigError("space: nothing to search")
    return dims
