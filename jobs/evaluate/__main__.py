"""Evaluate trained models: frozen-backbone probes, zero-shot variant scores, Gengram interpretability.

    python -m jobs.evaluate --config jobs/configs/evaluate-quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.evaluate --config <yaml> [key=value ...]

Embeddings run through Ray Data (an actor pool, one model copy per actor, a GPU each with
resources.use_gpu); probes and metrics on the driver. Outputs (Contract 4 of ARCHITECTURE.md) go to
`output` (default state/evaluations/<name>): embeddings and scores as Parquet, plots, the comparison
table and results.json, written last; the same in MLflow (a parent run, a child per model). Re-running
reuses every embedding whose model and task are unchanged.
"""

import sys

from jobs.common import cli
from jobs.evaluate import EvaluateConfig, run, summary

JOB = cli.Job("jobs.evaluate", __doc__, EvaluateConfig, run, summary)

if __name__ == "__main__":
    sys.exit(cli.main(JOB))
