"""Run an experiment: generate genomes, tokenise, pretrain a matrix of variants x seeds, sweep, evaluate, report.

    python -m jobs.experiment --config jobs/configs/experiment-laptop.yaml [--dry-run] [key=value ...]
    ray job submit --working-dir . -- python -m jobs.experiment --config <yaml>

Each step's output lies under `output` (default state/experiments/<name>), addressed by the hash of its
config and inputs; a finished step is skipped, so after a crash or Ctrl-C the same command continues.
--dry-run prints the plan (every step, whether it is done, the tokens still to train) without starting Ray.
The report (report.md with its plots, and one verdict line per claim of the paper) goes to the report
step's folder and to the experiment's MLflow parent run.
"""

import sys

from jobs.common import cli
from jobs.common.config import load_config
from jobs.common.ray_session import set_verbose
from jobs.experiment import ExperimentConfig, run, summary


def main(argv: list[str] | None = None) -> int:
    command = cli.parser("jobs.experiment", __doc__)
    command.add_argument("--dry-run", action="store_true", help="print the plan and what is done; start nothing")
    args = command.parse_args(argv)
    set_verbose(args.verbose)

    def work() -> int:
        result = run(load_config(ExperimentConfig, args.config, args.overrides), dry_run=args.dry_run)
        print(summary(result), flush=True)
        return cli.EXIT_OK

    return cli.guarded(work, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
