"""Search Gengram's window sizes and layer placements (and any pretraining key) with Ray Tune + Optuna.

    python -m jobs.tune --config jobs/configs/tune-quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tune --config <yaml> [key=value ...]

Every candidate value is checked against the model before any Ray work. Each trial is a short
pretraining run tracked as a child of the search's MLflow run, which gets the trial table, plots
and the best config at the end. Re-running a search with the same name continues it (finished
trials are kept, unfinished ones resume) unless fresh=true.
"""

from __future__ import annotations

import sys

from jobs.config import ConfigError, parse_job_args
from jobs.search import SearchInterrupted, TuneConfig, run, summary


def main(argv: list[str] | None = None) -> int:
    config = parse_job_args(TuneConfig, __doc__.splitlines()[0], argv)
    try:
        result = run(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SearchInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        return 130
    print(summary(result), flush=True)
    return 0 if result.best else 1


if __name__ == "__main__":
    sys.exit(main())
