"""Search Gengram's window sizes and layer placements (and any pretraining key) with Ray Tune + Optuna.

    python -m jobs.tune --config jobs/configs/tune-quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tune --config <yaml> [key=value ...]

Every candidate value is checked against the model before any Ray work. Each trial is a short
pretraining run tracked as a child of the search's MLflow run, which gets the trial table, plots
and the best config at the end. Re-running a search with the same name continues it (finished
trials are kept, unfinished ones resume) unless fresh=true. Exit code 1 when no trial ran its
whole budget, 130 when interrupted (run it again to continue).
"""

import sys

from jobs.common import cli
from jobs.tune import TuneConfig, TuneResult, run, summary


def has_best(result: TuneResult) -> bool:
    return result.best is not None


JOB = cli.Job("jobs.tune", __doc__, TuneConfig, run, summary, succeeded=has_best)

if __name__ == "__main__":
    sys.exit(cli.main(JOB))
