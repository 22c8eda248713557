"""Ray Tune + Optuna search over pretraining settings, Gengram's window size and layers first (jobs.tune).

A trial is a whole, short jobs.pretrain run (Ray Train + DeepSpeed with its own workers),
started from a Tune function trainable: Train V2 inside Tune. Each evaluation's val_loss
reaches Tune through Ray's Train->Tune report callback; OptunaSearch (TPE) proposes values
and ASHA stops trials that trail at an evaluation. Every trial trains on the same data for
the same number of steps and evaluates the same validation rows, so their val losses compare.

State, so that an interrupted search continues where it stopped: the Tune experiment under
`<storage>/<name>` (the trials' Train checkpoints in its `train/`), the Optuna study in an
SQL database (SQLite by default), and in MLflow a parent run for the search with one child
run per trial (the pretraining job's own run, tagged mlflow.parentRunId). At the end,
jobs.search_report writes the trial table, plots and best config into the parent run.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from pydantic import Field, model_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.search.optuna import OptunaSearch

from jobs.config import (
    ConfigError,
    StrictModel,
    apply_override,
    build_config,
    config_hash,
    config_to_dict,
    flatten,
    read_yaml,
)
from jobs.pretrain_config import PretrainConfig, validate
from jobs.storage import PROJECT_HOME_VARIABLE, absolute, join
from model.config import ModelConfig

if TYPE_CHECKING:
    from jobs.search_report import TrialRow

# The paper's sweeps (Fig. 2, Tables 1 and 13): windows in bp, `None` the window-free variant.
PAPER_WINDOWS: tuple[int | None, ...] = (6, 8, 9, 10, 12, 14, 15, 16, 18, 20, 21, 22, 24, 26, 27, 28, 30, None)
SINGLE_LAYERS = "single"  # in space.layers: every layer 1..L on its own
PAPER_LAYER_SETS = ("3,6,10", "10,11,12", "9,10,11,12", "3,6", "3,10")

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
METRIC = "val_loss"


class Range(StrictModel):
    """A numeric range to sample, e.g. {low: 1.0e-4, high: 1.0e-2, log: true}."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SpaceSection(StrictModel):
    """What the search varies: a list is a set of choices; null leaves the base config's value.

    window_size: bp, or `none` for the window-free variant. layers: a layer id, a set written
    "3,6,10" (or [3, 6, 10]), or `single` for each layer 1..L alone. ngram_sizes: sets like
    "1,2,3". params: any other pretraining key by its dotted name, with a list or a Range.
    """

    window_size: list[int | str | None] | None = Field(default_factory=lambda: list(PAPER_WINDOWS))
    layers: list[int | str | list[int]] | None = Field(default_factory=lambda: [SINGLE_LAYERS, *PAPER_LAYER_SETS])
    pooling: list[str] | None = None
    embed_dim_per_ngram: list[int] | None = None
    ngram_sizes: list[str | list[int]] | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class PretrainBase(StrictModel):
    """The pretraining config every trial starts from and the best config is written from."""

    config: str | None = None  # a pretraining YAML (path or fsspec URL); null: the job's defaults
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted key -> value, applied on top


class TrialSection(StrictModel):
    """What each trial runs on top of the base config: one short budget for all, so that val losses
    compare, and its resources (its Train run's workers come from the pretraining `resources` keys)."""

    max_steps: int = Field(8, ge=1)
    eval_every: int = Field(2, ge=1)  # each evaluation is a point where ASHA may stop the trial
    # The trial function only drives its Train run, whose workers request their own resources.
    driver_cpus: float = Field(1, gt=0)
    overrides: dict[str, Any] = Field(default_factory=dict)  # pretraining keys for trials only


class SearchSection(StrictModel):
    num_samples: int = Field(16, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    seed: int = 0  # TPE's
    # Run first, e.g. the paper's choice: {window_size: 21, layers: "3,6,10"}; every point names
    # every searched setting.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    # Any SQLAlchemy URL. The study takes the search's name, for Optuna's own tools to open; it
    # stores choices as their labels ("21", "none", "3,6,10").
    study_storage: str = "sqlite:///state/tune/optuna.db"


class AshaSection(StrictModel):
    grace_period: int = Field(2, ge=1)  # steps every trial runs before ASHA may stop it
    reduction_factor: float = Field(2, gt=1)


class TuneConfig(StrictModel):
    # The Tune experiment, the Optuna study and the MLflow parent run all take this name.
    name: str = Field("gengram-search", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str = "state/tune"  # Tune experiments: a local directory or any URL such as s3://bucket/tune
    # Start over: delete this name's Tune experiment and Optuna study and set its MLflow runs aside.
    fresh: bool = False
    pretrain: PretrainBase = Field(default_factory=PretrainBase)
    trial: TrialSection = Field(default_factory=TrialSection)
    space: SpaceSection = Field(default_factory=SpaceSection)
    search: SearchSection = Field(default_factory=SearchSection)
    asha: AshaSection = Field(default_factory=AshaSection)

    @model_validator(mode="after")
    def _budget_fits(self) -> TuneConfig:
        if self.asha.grace_period > self.trial.max_steps:
            raise ValueError(f"asha.grace_period={self.asha.grace_period} exceeds "
                             f"trial.max_steps={self.trial.max_steps}")
        return self


# ----------------------------------------------------------------------------- search space


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


# ----------------------------------------------------------------------------- configs


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
class SearchPlan:
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


def plan_search(config: TuneConfig) -> SearchPlan:
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
    return SearchPlan(config, base, trial_base, dims, points, base_config, trial_base_config, model)


# ----------------------------------------------------------------------------- the trial


class ReportEvaluationsToTune(TuneReportCallback):
    """Ray's Train->Tune report callback for the evaluations before a run's last step.

    A checkpoint between evaluations reports the previous evaluation's val_loss, which ASHA
    must not compare with other trials' at this step. And ASHA stops a trial as soon as Tune
    sees it reach max_t, which would end the trial's actor while the pretraining job still
    exports its final model and closes its MLflow run: the trial function reports the final
    metrics itself once the job has returned."""

    def __init__(self, eval_every: int):
        super().__init__()
        self.eval_every = eval_every

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics[0]["step"] % self.eval_every == 0 and not metrics[0].get("final"):
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], plan: SearchPlan) -> None:
    """One trial: a short pretraining run with the sampled values, as a child of the search's MLflow run."""
    from jobs.pretrain import run as pretrain

    # Tune starts trials in their own directory: resolve relative paths where the driver does.
    os.environ[PROJECT_HOME_VARIABLE] = plan.home
    trial_id = tune.get_context().get_trial_id()
    result = pretrain(plan.trial_config(params, trial_id), parent_run_id=plan.parent_run_id,
                      train_callbacks=[ReportEvaluationsToTune(plan.config.trial.eval_every)])
    # Also the only report when a restored search re-runs a trial whose training had finished.
    tune.report(result.metrics)


class BudgetAwareOptunaSearch(OptunaSearch):
    """Tells Optuna that a trial ASHA stopped was PRUNED (at its last val_loss), not COMPLETE: that
    loss came after fewer steps and does not compare, and Optuna's best trial and parameter
    importances take COMPLETE trials only."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = result is not None and not error and not result.get("final")
        if stopped_early:
            # The result ASHA stopped on comes here, not to on_trial_result: record it, so that
            # the pruned trial keeps it as its value.
            self.on_trial_result(trial_id, result)
        super().on_trial_complete(trial_id, None if stopped_early else result, error)


class ResumableASHAScheduler(tune.schedulers.ASHAScheduler):
    """ASHA whose rungs survive Tuner.restore. Tune restores a searcher's state but not a
    scheduler's, so a restored search would judge its remaining trials only against each other:
    each trial Tune re-adds from a saved experiment replays the results it had reported."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.run_metadata.last_result:  # a restored trial that had reported; new ones have not
            for result in saved_results(trial):
                self.on_trial_result(tune_controller, trial, result)  # records the rungs; decisions were made then


def saved_results(trial) -> list[dict[str, Any]]:
    """The results Tune logged for a trial (its result.json, one JSON object a line)."""
    path = f"{trial.storage.trial_fs_path}/{EXPR_RESULT_FILE}"
    try:
        with trial.storage.storage_filesystem.open_input_stream(path) as handle:
            lines = handle.readall().decode().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def trial_dirname(trial) -> str:
    """A trial's directory is its id: the report matches Tune's results to MLflow runs by it."""
    return trial.trial_id


# ----------------------------------------------------------------------------- MLflow

OUTCOME_TAG = "tune.outcome"


OUTCOMES = ("completed", "stopped_early", "error")


def outcome_counts(rows: list[TrialRow]) -> dict[str, int]:
    return {name: sum(row.outcome == name for row in rows) for name in OUTCOMES}


def outcome(result: Mapping[str, Any] | None, error: bool) -> str:
    if error:
        return "error"
    return "completed" if (result or {}).get("final") else "stopped_early"


def child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The search's trial runs by run name."""
    from jobs.tracking import RUN_NAME_TAG

    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=50_000)
    return {run.data.tags.get(RUN_NAME_TAG): run for run in runs}


def close_trial_run(client, run, trial_id: str, trial_outcome: str) -> None:
    """Tag a trial's run with its outcome; end it if Tune ended the trial before the pretraining
    job could (ASHA stops a trial by ending its actor)."""
    client.set_tag(run.info.run_id, "tune.trial_id", trial_id)
    client.set_tag(run.info.run_id, OUTCOME_TAG, trial_outcome)
    status = {"stopped_early": "KILLED", "error": "FAILED"}.get(trial_outcome)
    if status and client.get_run(run.info.run_id).info.status != status:
        client.set_terminated(run.info.run_id, status)


class CloseTrialRuns(tune.Callback):
    """Closes each trial's MLflow run as Tune ends the trial (pickled with the experiment: keeps no client)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, name: str):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.name = parent_run_id, name

    def _close(self, trial, error: bool) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        run = child_runs(client, self.experiment_id, self.parent_run_id).get(f"{self.name}-{trial.trial_id}")
        if run is not None:
            close_trial_run(client, run, trial.trial_id, outcome(trial.last_result, error))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, error=True)


# ----------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    study_storage: str
    rows: list[TrialRow]
    best: TrialRow | None
    artifacts: list[str]
    wall_s: float
    restored: bool


def study_storage(config: TuneConfig) -> str:
    """The study's SQLAlchemy URL, a relative SQLite path made absolute (and its directory made)."""
    prefix = "sqlite:///"
    url = config.search.study_storage
    if not url.startswith(prefix):
        return url
    path = Path(absolute(url[len(prefix):]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{prefix}{path}"


def search_hash(config: TuneConfig) -> str:
    """What a restored search must share with the one it continues (everything but `fresh`)."""
    return config_hash({key: value for key, value in config_to_dict(config).items() if key != "fresh"})


def required_cpus(plan: SearchPlan) -> int:
    """Logical CPUs for a local cluster: max_concurrent_trials trials, each its driver and its run's needs."""
    from jobs.pretrain import required_cpus as run_cpus

    per_trial = plan.config.trial.driver_cpus + run_cpus(plan.trial_base_config)
    return math.ceil(plan.config.search.max_concurrent_trials * per_trial)


class SearchInterrupted(RuntimeError):
    """Tune stopped before every trial ended (Ctrl-C, `ray job stop`); its state is saved."""


def continues_earlier_search(plan: SearchPlan, client, experiment_id: str, study_url: str, storage_path: str,
                             storage_fs) -> bool:
    """Whether a saved Tune experiment of this name is there to restore. fresh=true first removes
    it and the Optuna study and sets earlier MLflow runs of the name aside; without it, a new
    search refuses to start over such leftovers of an earlier one."""
    from jobs.storage import filesystem
    from jobs.tracking import RUN_NAME_TAG

    config = plan.config
    experiment_fs, experiment_path = filesystem(plan.experiment_url,
                                                plan.base_config.storage_options(plan.experiment_url))
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.name}'")
    study_exists = config.name in optuna.study.get_all_study_names(study_url)
    if config.fresh:
        if experiment_fs.exists(experiment_path):
            experiment_fs.rm(experiment_path, recursive=True)
        if study_exists:
            optuna.delete_study(study_name=config.name, storage=study_url)
        for parent in parents:  # kept in MLflow, no longer found by this name
            client.set_tag(parent.info.run_id, RUN_NAME_TAG, f"{config.name}@{parent.info.run_id}")
        return False
    if tune.Tuner.can_restore(join(storage_path, config.name), storage_filesystem=storage_fs):
        if not parents or parents[0].data.tags.get("tune.search_hash") != search_hash(config):
            raise ConfigError(f"search {config.name!r} was started with a different config (or its MLflow run is "
                              "gone); rerun it with the config it started with, or set fresh=true to start over")
        return True
    leftovers = [f"Optuna study {config.name!r} in {study_url}"] * study_exists
    leftovers += [f"MLflow run {parent.info.run_id}" for parent in parents]
    if leftovers:
        raise ConfigError(f"search {config.name!r} has no Tune experiment under {config.storage} to continue, but "
                          f"{' and '.join(leftovers)} exist from an earlier one; set fresh=true to start over, or "
                          "choose another name")
    return False


def new_tuner(plan: SearchPlan, trainable, experiment_id: str, storage_path: str, storage_fs) -> tune.Tuner:
    config = plan.config
    searcher = BudgetAwareOptunaSearch(
        space={dim.name: dim.distribution() for dim in plan.dims}, metric=METRIC, mode="min",
        points_to_evaluate=plan.points, sampler=optuna.samplers.TPESampler(seed=config.search.seed),
        study_name=config.name, storage=optuna.storages.RDBStorage(study_storage(config)),
    )
    scheduler = ResumableASHAScheduler(
        time_attr="step", metric=METRIC, mode="min", max_t=config.trial.max_steps,
        grace_period=config.asha.grace_period, reduction_factor=config.asha.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=config.search.num_samples,
                                    max_concurrent_trials=config.search.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=config.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                  callbacks=[CloseTrialRuns(plan.tracking_uri, experiment_id, plan.parent_run_id,
                                                            config.name)]),
    )


def run(config: TuneConfig) -> SearchResult:
    """Check the search, then run it (or continue it) on the Ray cluster and report it in MLflow."""
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.cluster import ensure_ray
    from jobs.pretrain import check_dataset
    from jobs.search_report import report
    from jobs.storage import pyarrow_filesystem

    started = time.monotonic()
    plan = plan_search(config)
    base = plan.base_config
    check_dataset(base, plan.model)
    plan.tracking_uri = tracking.resolve_tracking_uri(base.tracking.uri)
    tracking.preflight(plan.tracking_uri, base.tracking.preflight_timeout_s)
    client = MlflowClient(plan.tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, base.tracking.experiment, base.tracking.artifact_root)
    storage_path, storage_fs = pyarrow_filesystem(absolute(config.storage), base.storage_options(config.storage))
    study_url = study_storage(config)
    restoring = continues_earlier_search(plan, client, experiment_id, study_url, storage_path, storage_fs)

    params = tracking.params_from_config(config_to_dict(config))
    tags = {"tune.search_hash": search_hash(config), "tune.experiment_path": plan.experiment_url,
            "optuna.storage": study_url, "optuna.study_name": config.name, **tracking.ray_job_tags()}
    plan.parent_run_id, _ = tracking.start_or_resume_run(client, experiment_id, config.name, params, tags)
    print(f"MLflow parent run {plan.parent_run_id} in {plan.tracking_uri}; "
          f"{'restoring' if restoring else 'starting'} Tune experiment {plan.experiment_url}", flush=True)
    try:
        ensure_ray(local_num_cpus=required_cpus(plan))
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": config.trial.driver_cpus})
        if restoring:
            # Finished trials stay as they are; unfinished ones resume (their Train runs from
            # their last checkpoints); the searcher, scheduler and callbacks come back as saved.
            tuner = tune.Tuner.restore(join(storage_path, config.name), trainable=trainable,
                                       storage_filesystem=storage_fs)
        else:
            tuner = new_tuner(plan, trainable, experiment_id, storage_path, storage_fs)
        grid = tuner.fit()
        if grid.num_terminated + grid.num_errors < config.search.num_samples:
            raise SearchInterrupted(f"search {config.name!r} was interrupted; run the same command again to "
                                    "continue it")
        rows, best, artifacts = report(plan, grid, client, experiment_id)
    except SearchInterrupted:
        client.set_terminated(plan.parent_run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(plan.parent_run_id, "FAILED")
        raise
    client.set_terminated(plan.parent_run_id, "FINISHED")
    return SearchResult(config.name, plan.parent_run_id, plan.tracking_uri, plan.experiment_url, study_url,
                        rows, best, artifacts, time.monotonic() - started, restoring)


def summary(result: SearchResult) -> str:
    lines = ["", f"Search {result.name} finished{' (restored)' if result.restored else ''} "
             f"in {result.wall_s:.0f} s.",
             f"  MLflow parent run: {result.parent_run_id} ({result.tracking_uri})",
             f"  Tune experiment:   {result.experiment_path}",
             f"  Optuna study:      {result.name} in {result.study_storage}"]
    counts = outcome_counts(result.rows)
    lines.append("  trials:            " + ", ".join(f"{count} {name.replace('_', ' ')}"
                                                    for name, count in counts.items()))
    if result.best:
        values = ", ".join(f"{name}={value}" for name, value in result.best.params.items())
        lines.append(f"  best trial:        {result.best.trial_id}  {METRIC} {result.best.val_loss:.4f}  ({values})")
        lines.append("  best config:       artifact best_config.yaml of the parent run")
    else:
        lines.append("  no trial ran its whole budget")
    return "\n".join(lines)
