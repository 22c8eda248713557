"""The conversion job's typed config: which way, from where, to where, and how to write Megatron's layout.

    direction: import   checkpoint (a Megatron checkpoint directory, local or any fsspec URL) -> output
                        (an exported model directory, model.exported's format)
    direction: export   model (an exported model directory) -> output (a legacy `torch` Megatron checkpoint)

An import with `register: <name>` also logs the exported model to MLflow (`tracking`) and registers it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from jobs.common.config import StrictModel
from jobs.common.storage import StorageRule, options_for
from jobs.common.tracking import TrackingSection
from model.config import FLAVOURS


class ExportSection(StrictModel):
    """How an export writes Megatron's layout. The release's: the transformer-engine layer spec (attention
    norm fused into the QKV GEMM) with grouped experts (--moe-grouped-gemm), two pipeline stages."""

    layer_spec: Literal["transformer_engine", "local"] = "transformer_engine"
    grouped_experts: bool = True
    pipeline_stages: int = Field(2, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the fork casts on load; float32 loses nothing
    iteration: int = Field(1, ge=0)  # the iteration number the checkpoint is written as

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class ConvertTracking(TrackingSection):
    experiment: str = "gengram-convert"


class ConvertConfig(StrictModel):
    direction: Literal["import", "export"] = "import"
    checkpoint: str | None = None  # import: the Megatron checkpoint directory
    iteration: int | None = Field(None, ge=0)  # import: which iteration; null = the latest
    model: str | None = None  # export: the exported model directory
    output: str
    flavour: str | None = None  # import: the model flavour the checkpoint must match (e.g. gengram-10b)
    force: bool = False  # replace an existing output
    # import: the registered model name to log the output under; null: none. Spelt `register` in a config
    # (the field's own name would shadow pydantic's inherited ABC `register`).
    registered_name: str | None = Field(None, alias="register")
    tracking: ConvertTracking = Field(default_factory=ConvertTracking)
    export: ExportSection = Field(default_factory=ExportSection)
    storage: list[StorageRule] = Field(default_factory=list)  # endpoints and anonymous access, no secrets

    @model_validator(mode="after")
    def _inputs_of_its_direction(self) -> ConvertConfig:
        problems = []
        if self.direction == "import" and not self.checkpoint:
            problems.append("checkpoint: an import reads a Megatron checkpoint directory; set checkpoint=<dir or URL>")
        if self.direction == "export" and not self.model:
            problems.append("model: an export reads an exported model directory; set model=<dir or URL>")
        if self.direction == "export" and self.registered_name is not None:
            problems.append("register: only an import makes a model to register; an export writes Megatron's layout")
        if self.flavour is not None and self.flavour not in FLAVOURS:
            problems.append(f"flavour: {self.flavour!r} is unknown; choose one of {sorted(FLAVOURS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def storage_options(self, url: str) -> dict:
        return options_for(url, self.storage)
