"""Pretrain GengramLM with Ray Train + DeepSpeed, tracked in MLflow.

    python -m jobs.pretrain --config jobs/configs/pretrain-quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.pretrain --config <yaml> [key=value ...]

The same command runs a CPU smoke run (gloo, DeepSpeed's CPU accelerator) and a multi-node GPU
run (NCCL), changing only config (`resources.use_gpu`, sizes). Re-running with the same
`run_name` resumes from the run's latest checkpoint.
"""

import sys

from jobs.common import cli
from jobs.pretrain import PretrainConfig, run, summary

JOB = cli.Job("jobs.pretrain", __doc__, PretrainConfig, run, summary)

if __name__ == "__main__":
    sys.exit(cli.main(JOB))
