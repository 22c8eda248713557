"""The pretraining job's typed config, its cross-field checks, and the DeepSpeed config it implies.

Everything here runs on the driver before any worker starts, so a batch size that does not
divide or an ep_size that does not fit fails in a second with the key named.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from jobs.common.config import ConfigError, StrictModel
from jobs.common.storage import StorageRule, options_for
from jobs.common.tracking import TrackingSection
from model.config import ModelConfig, flavour


class ModelSection(StrictModel):
    flavour: str = "debug"
    # Any ModelConfig field, e.g. {"gengram_layers": [3, 6], "gengram": {"window_size": 15}}.
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Continued pretraining: a final_model directory (local or URL) whose weights start this run.
    init_from: str | None = None


class DataSection(StrictModel):
    dataset: str = "state/datasets/quickstart"
    shuffle_buffer_rows: int = Field(1024, ge=0)
    seed: int = 0


class TrainSection(StrictModel):
    max_steps: int = Field(200, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    global_batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    # Paper schedule: linear warmup over 5% of steps, cosine decay to min_lr over 80%.
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    decay_fraction: float = Field(0.8, gt=0, le=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainSection:
        if self.warmup_fraction >= self.decay_fraction:
            raise ValueError("train.warmup_fraction must be smaller than train.decay_fraction")
        if self.min_lr > self.lr:
            raise ValueError("train.min_lr must not exceed train.lr")
        return self


class DeepSpeedSection(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    # Merged last into the generated DeepSpeed config, for options this schema does not name.
    extra: dict[str, Any] = Field(default_factory=dict)


class CheckpointSection(StrictModel):
    every: int = Field(50, ge=1)
    # Ray Train storage: a local directory or any pyarrow/fsspec URL such as s3://bucket/prefix.
    storage: str = "state/checkpoints"
    keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)


class ResourcesSection(StrictModel):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)


class PretrainTracking(TrackingSection):
    experiment: str = "gengram-pretrain"
    # Registered-model name for the final model; null leaves the registry alone.
    registered_model: str | None = "gengram-debug"
    system_metrics: bool = True


class PretrainConfig(StrictModel):
    run_name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    tracking: PretrainTracking = Field(default_factory=PretrainTracking)
    # Endpoints and anonymous access per URL prefix (e.g. an S3-compatible store); there is
    # no field for a credential: those come from the environment or instance roles only.
    storage: list[StorageRule] = Field(default_factory=list)

    def storage_options(self, url: str) -> dict[str, Any]:
        return options_for(url, self.storage)

    def model_config_resolved(self) -> ModelConfig:
        """The ModelConfig this run trains; a bad flavour or override is a ConfigError naming it."""
        try:
            return flavour(self.model.flavour, **self.model.overrides)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model (flavour {self.model.flavour!r}, overrides): {error}") from None

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.resources.num_workers)


def validate(config: PretrainConfig) -> ModelConfig:
    """Cross-field checks the schema cannot express; returns the resolved model config."""
    model = config.model_config_resolved()
    train, workers = config.train, config.resources.num_workers
    per_step = train.micro_batch_size * workers
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x resources.num_workers={workers} = {per_step}"
        )
    if model.is_moe and workers % model.ep_size:
        raise ConfigError(
            f"model.overrides.ep_size={model.ep_size} does not divide resources.num_workers={workers}"
        )
    if model.is_moe and config.deepspeed.zero_stage == 3:
        raise ConfigError("deepspeed.zero_stage=3 is not supported by DeepSpeed for MoE models; use 0, 1 or 2")
    return model


def lr_at(step: int, train: TrainSection) -> float:
    """Learning rate after `step` optimizer steps: linear warmup, cosine decay, then min_lr."""
    warmup = math.ceil(train.warmup_fraction * train.max_steps)
    decay_end = max(warmup + 1, math.ceil(train.decay_fraction * train.max_steps))
    if step < warmup:
        return train.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (decay_end - warmup))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def deepspeed_config(config: PretrainConfig) -> dict[str, Any]:
    train = config.train
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: PyTorch's AdamW instead of DeepSpeed's fused/CPU Adam, which would
            # need a compiler toolchain at start-up; GPU runs can flip it in deepspeed.extra.
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": config.deepspeed.precision == "bf16"},
        "steps_per_print": 10**9,  # progress goes to MLflow and Ray's logs, not DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
    return _merge(ds, config.deepspeed.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged
