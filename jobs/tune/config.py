"""The tune job's typed config: the base pretraining config, what each trial runs, the search
space, the searcher (Optuna's TPE) and the scheduler (ASHA)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from jobs.common.config import (
    StrictModel,
)

# The paper's sweeps (Fig. 2, Tables 1 and 13): windows in bp, `None` the window-free variant.
PAPER_WINDOWS: tuple[int | None, ...] = (6, 8, 9, 10, 12, 14, 15, 16, 18, 20, 21, 22, 24, 26, 27, 28, 30, None)
SINGLE_LAYERS = "single"  # in space.layers: every layer 1..L on its own
PAPER_LAYER_SETS = ("3,6,10", "10,11,12", "9,10,11,12", "3,6", "3,10")

# What trials are compared on: every trial evaluates the same validation rows.
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


class SearcherSection(StrictModel):
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
    search: SearcherSection = Field(default_factory=SearcherSection)
    asha: AshaSection = Field(default_factory=AshaSection)

    @model_validator(mode="after")
    def _budget_fits(self) -> TuneConfig:
        if self.asha.grace_period > self.trial.max_steps:
            raise ValueError(f"asha.grace_period={self.asha.grace_period} exceeds "
                             f"trial.max_steps={self.trial.max_steps}")
        return self
