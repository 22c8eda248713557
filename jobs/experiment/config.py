"""The experiment's typed config: generated genome sets, the datasets tokenised from them, a matrix of
pretraining variants x seeds per dataset at equal tokens, a window sweep, an evaluation, and the report.

Every step's job config is built and validated from this before any Ray work (`jobs.experiment.plan`),
so a typo in a variant costs seconds. The steps' own keys are those of their jobs: a variant is a set of
pretraining overrides, a dataset a set of tokenize keys, the evaluation's tasks are jobs.evaluate tasks.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from jobs.common.config import StrictModel
from jobs.common.tracking import TrackingSection
from jobs.tokenize import Structure, named_structure

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A string of this form anywhere in `evaluate` stands for a file of a generated genome set: its first
# genome's FASTA, or with `:gff3` that genome's GFF3 of planted elements.
GENOME_REFERENCE = "genomes:"


class GenomeSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    contigs: list[int] = Field(min_length=1)
    seed: int


class GenomeSet(StrictModel):
    """Genomes generated together, sharing repeat families and motif profiles (jobs/tokenize/genomes.py)."""

    structure: Structure = Field(default_factory=Structure)
    genomes: list[GenomeSpec] = Field(min_length=1)

    @field_validator("structure", mode="before")
    @classmethod
    def _named(cls, value):
        return named_structure(value)


class DatasetSpec(StrictModel):
    """A dataset tokenised from a generated genome set (`genomes`) or from real assemblies (`assemblies`:
    assembly list files, as jobs.tokenize reads them)."""

    genomes: str | None = None  # a genome set's name
    assemblies: list[str] | None = None
    tokenize: dict[str, Any] = Field(default_factory=dict)  # tokenize keys, except inputs/assemblies/output

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.genomes is None) == (self.assemblies is None):
            raise ValueError("give exactly one of `genomes` (a generated set) or `assemblies` (assembly lists)")
        return self


class PretrainSection(StrictModel):
    """Every (dataset, variant, seed) is one run: the base config, its overrides, the variant's, and the
    seed as `train.seed` and `data.seed` (so variants with one seed see the same data in the same order)."""

    config: str = "jobs/configs/pretrain-quickstart.yaml"
    overrides: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # Other seeds for some datasets, e.g. fewer for a negative control.
    dataset_seeds: dict[str, list[int]] = Field(default_factory=dict)
    # The variant that is the paper's claim, and the one it is compared with.
    treatment: str = "gengram"
    control: str = "baseline"

    def seeds_of(self, dataset: str) -> list[int]:
        return self.dataset_seeds.get(dataset, self.seeds)


class WindowSweep(StrictModel):
    """Gengram's window over `values` (bp; `none`: no pooling) as a jobs.tune grid at the pretraining
    budget, starting from `variant` on `dataset`, seed `seed`."""

    dataset: str
    variant: str = "gengram"
    values: list[int | None] = Field(min_length=2)
    seed: int = 0
    max_concurrent_trials: int = Field(1, ge=1)

    @field_validator("values", mode="before")
    @classmethod
    def _none(cls, values):
        return [None if v in ("none", "null") else v for v in values] if isinstance(values, list) else values


class EvaluateSection(StrictModel):
    """A jobs.evaluate config (tasks, probes, embedding, interpretability, resources) for the models the
    matrix trained on `dataset` with `seed`, one per variant, beside the k-mer and untrained references:
    `base` (an evaluation YAML, whose models, name, output and tracking the experiment replaces) with
    `config` on top."""

    dataset: str
    seed: int = 0
    base: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class NegativeControl(StrictModel):
    """A dataset on which nothing beyond base composition can be learnt: a model whose val loss goes more
    than `tolerance` below the val rows' unigram entropy there sees its future."""

    dataset: str
    tolerance: float = Field(0.01, gt=0)


class ExperimentTracking(TrackingSection):
    experiment: str = "gengram-experiments"


class ExperimentConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    output: str | None = None  # local dir or fsspec URL; null: state/experiments/<name>
    genomes: dict[str, GenomeSet] = Field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = Field(min_length=1)
    pretrain: PretrainSection
    windows: WindowSweep | None = None
    evaluate: EvaluateSection | None = None
    negative_control: NegativeControl | None = None
    tracking: ExperimentTracking = Field(default_factory=ExperimentTracking)
    # Steps at a time, when the cluster has room for them (each asks for what its job needs).
    max_concurrent_steps: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _names_resolve(self) -> ExperimentConfig:
        for name, dataset in self.datasets.items():
            if dataset.genomes is not None and dataset.genomes not in self.genomes:
                raise ValueError(f"datasets.{name}.genomes: no genome set {dataset.genomes!r}")
            for key in ("inputs", "assemblies", "output"):
                if key in dataset.tokenize:
                    raise ValueError(f"datasets.{name}.tokenize.{key}: set by the experiment")
        pretrain = self.pretrain
        for where, names, known in (("pretrain.datasets", pretrain.datasets, self.datasets),
                                    ("pretrain.treatment/control", [pretrain.treatment, pretrain.control],
                                     pretrain.variants)):
            missing = [n for n in names if n not in known]
            if missing:
                raise ValueError(f"{where}: {', '.join(map(repr, missing))} not defined")
        for where, section in (("windows", self.windows), ("evaluate", self.evaluate),
                               ("negative_control", self.negative_control)):
            if section is not None and section.dataset not in pretrain.datasets:
                raise ValueError(f"{where}.dataset: {section.dataset!r} is not one of pretrain.datasets")
        if self.windows is not None and self.windows.variant not in pretrain.variants:
            raise ValueError(f"windows.variant: {self.windows.variant!r} is not one of pretrain.variants")
        unknown = [name for name in pretrain.dataset_seeds if name not in pretrain.datasets]
        if unknown:
            raise ValueError(f"pretrain.dataset_seeds: {', '.join(map(repr, unknown))} not in pretrain.datasets")
        if self.evaluate is not None and self.evaluate.seed not in pretrain.seeds_of(self.evaluate.dataset):
            raise ValueError(f"evaluate.seed: {self.evaluate.seed} is not a seed of dataset {self.evaluate.dataset!r}")
        return self

    @property
    def output_url(self) -> str:
        return self.output or f"state/experiments/{self.name}"
