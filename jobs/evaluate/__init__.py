"""The evaluation job (`python -m jobs.evaluate`): frozen-backbone probes, zero-shot variant scores and
Gengram interpretability, on Ray Data, tracked in MLflow (Contract 4 of ARCHITECTURE.md).

Public API, for other jobs and people: the config, `run`, what a run returns, and the results reader.
The rest of the package (sources, models, embed, probes, kmer, interpret, analyses, report, outputs) is
internal.
"""

from jobs.evaluate.config import EvaluateConfig
from jobs.evaluate.job import EvaluationResult, run, summary
from jobs.evaluate.outputs import MetricRow, read_results

__all__ = ["EvaluateConfig", "EvaluationResult", "MetricRow", "read_results", "run", "summary"]
