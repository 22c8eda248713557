"""Tokenise genome assemblies into a dataset of Parquet shards with Ray Data (ARCHITECTURE.md, Contracts 1-3).

    python -m jobs.tokenize --config jobs/configs/tokenize-quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tokenize --config <yaml> [key=value ...]

The config is checked whole (keys, groups, the inputs, the output) before any Ray work; a
finished dataset with the same config is left alone unless force=true.
"""

import sys

from jobs.common import cli
from jobs.tokenize import TokenizeConfig, run, summary

JOB = cli.Job("jobs.tokenize", __doc__, TokenizeConfig, run, summary)

if __name__ == "__main__":
    sys.exit(cli.main(JOB))
