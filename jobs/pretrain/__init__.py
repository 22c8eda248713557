"""The pretraining job (`python -m jobs.pretrain`): GengramLM with Ray Train + DeepSpeed, tracked in MLflow.

Public API, for other jobs (`jobs.tune`) and people: the config, `run`, and what a run returns.
The rest of the package (worker, metrics, weights) is internal.
"""

from jobs.pretrain.config import PretrainConfig, validate
from jobs.pretrain.job import (
    PretrainResult,
    check_dataset,
    final_model_url,
    required_cpus,
    run,
    summary,
)

__all__ = [
    "PretrainConfig", "PretrainResult", "check_dataset", "final_model_url", "required_cpus", "run", "summary",
    "validate",
]
