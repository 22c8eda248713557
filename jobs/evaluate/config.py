"""The evaluation job's typed config: which models, which tasks, how embeddings are taken, which probes,
zero-shot scoring, the interpretability analyses, resources and tracking.

Everything is checked here and in `jobs.evaluate.models.resolve` (which reads each model's config) before
any Ray work starts: a typo, a task with one class or a model whose context is too short costs seconds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jobs.common.config import StrictModel
from jobs.common.storage import StorageRule, join, options_for
from jobs.common.tracking import TrackingSection
from jobs.evaluate.probes import ProbesConfig
from jobs.evaluate.sources import TaskSource

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Analysis = Literal["write_intensity", "rc_symmetry", "logit_lens"]


class ModelEntry(StrictModel):
    """A model to evaluate. `uri`: an MLflow model URI (models:/<name>/<version>, models:/<name>@<alias>,
    runs:/<run id>/model) or an exported final_model directory (local or any fsspec URL).
    Built-in references need no uri: `kind: kmer` (the k-mer spectrum, k = 1..6, normalised counts: the
    classic baseline) and `kind: random_init, like: <model name>` (that architecture untrained: the floor)."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["trained", "kmer", "random_init"] = "trained"
    uri: str | None = None
    like: str | None = None
    seed: int = 0  # random_init: the initialisation's seed

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> ModelEntry:
        if self.kind == "trained" and not self.uri:
            raise ValueError(f"model {self.name!r} needs a uri (or kind: kmer / random_init)")
        if self.kind != "trained" and self.uri:
            raise ValueError(f"model {self.name!r} of kind {self.kind} takes no uri")
        if (self.kind == "random_init") != (self.like is not None):
            raise ValueError(f"model {self.name!r}: `like` names the model a random_init copies, and only then")
        return self


class TaskEntry(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["classification", "variant_effect"] = "classification"
    source: TaskSource


class EmbeddingSection(StrictModel):
    """How a sequence becomes a vector. Layer l is the residual stream after layer l; `last` is the final
    layer after the final norm (what the LM head reads). Pooling runs over the non-PAD positions."""

    layers: Literal["last", "all"] | list[int] = "last"
    pooling: Literal["mean", "max", "last", "center"] = "mean"
    reverse_complement: Literal["none", "average"] = "none"
    batch_size: int = Field(16, ge=1)
    # A sequence longer than the model's context: `error` names it; `window` embeds consecutive
    # context-length windows and averages their pooled vectors, weighted by length.
    long: Literal["error", "window"] = "error"


class ZeroShotSection(StrictModel):
    """Variant effect without training (Evo2's convention): score = log-likelihood(alt window) -
    log-likelihood(ref window), over the window's predicted tokens."""

    reduction: Literal["sum", "mean"] = "sum"
    window: int | None = Field(None, ge=2)  # centred crop of each window; null: the whole window the task gives
    embedding_probe: bool = True  # also ref and alt embeddings concatenated, then the probes (as Caduceus)


class InterpretabilitySequences(StrictModel):
    """What the analyses are drawn on: a FASTA (with an optional GFF3/GTF whose features become tracks),
    or the test split of a classification task."""

    fasta: str | None = None
    annotation: str | None = None
    task: str | None = None
    max_sequences: int = Field(4, ge=1)
    length: int = Field(1024, ge=8)  # bases per FASTA record read (the model's context if that is shorter)
    # A feature type of the annotation (e.g. CRM, TF_binding_site, exon): windows of `length` centred on its
    # first `max_sequences` features instead of each record's first bases, which may hold no feature at all.
    around: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InterpretabilitySequences:
        if (self.fasta is None) == (self.task is None):
            raise ValueError("interpretability.sequences needs exactly one of `fasta` or `task`")
        if self.annotation is not None and self.fasta is None:
            raise ValueError("interpretability.sequences.annotation goes with `fasta`")
        if self.around is not None and self.annotation is None:
            raise ValueError("interpretability.sequences.around names a feature type of `annotation`: give one")
        return self


class InterpretabilitySection(StrictModel):
    analyses: list[Analysis] = Field(default_factory=list)
    sequences: InterpretabilitySequences | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _sequences_when_needed(self) -> InterpretabilitySection:
        needs_sequences = {"write_intensity", "logit_lens"} & set(self.analyses)
        if needs_sequences and self.sequences is None:
            raise ValueError(f"interpretability.sequences is needed for {', '.join(sorted(needs_sequences))}")
        return self


class ResourcesSection(StrictModel):
    actors: int = Field(1, ge=1)  # embedding actors, each holding one copy of the model
    cpus_per_actor: float = Field(1, gt=0)
    use_gpu: bool = False
    gpus_per_actor: float = Field(1, gt=0)  # with use_gpu


class EvaluateTracking(TrackingSection):
    experiment: str = "gengram-evaluate"


class EvaluateConfig(StrictModel):
    name: str = Field("quickstart", pattern=NAME_PATTERN)
    output: str | None = None  # local dir or fsspec URL; null: state/evaluations/<name>
    model_cache: str = "state/cache/models"  # local copies of models from MLflow or an object store
    models: list[ModelEntry] = Field(min_length=1)
    tasks: list[TaskEntry] = Field(default_factory=list)
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    zero_shot: ZeroShotSection = Field(default_factory=ZeroShotSection)
    interpretability: InterpretabilitySection = Field(default_factory=InterpretabilitySection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    tracking: EvaluateTracking = Field(default_factory=EvaluateTracking)
    storage: list[StorageRule] = Field(default_factory=list)  # endpoints and anonymous access, no secrets

    @model_validator(mode="after")
    def _names_resolve(self) -> EvaluateConfig:
        for what, names in (("models", [m.name for m in self.models]), ("tasks", [t.name for t in self.tasks])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{what}: the name {repeated[0]!r} is used twice")
        trained = {m.name for m in self.models if m.kind == "trained"}
        for entry in self.models:
            if entry.like is not None and entry.like not in trained:
                raise ValueError(f"models.{entry.name}.like={entry.like!r} names no trained model of this config")
        sequences = self.interpretability.sequences
        if sequences is not None and sequences.task is not None:
            by_name = {t.name: t for t in self.tasks}
            if by_name.get(sequences.task) is None or by_name[sequences.task].kind != "classification":
                raise ValueError(f"interpretability.sequences.task={sequences.task!r} names no classification task")
        if not self.tasks and not self.interpretability.analyses:
            raise ValueError("nothing to do: give tasks, interpretability.analyses, or both")
        return self

    @property
    def output_url(self) -> str:
        return self.output or join("state/evaluations", self.name)

    def storage_options(self, url: str) -> dict:
        return options_for(url, self.storage)
