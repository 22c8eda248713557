"""The quickstart: tokenise the quickstart genomes, pretrain the debug flavour, show where to look.

    python -m jobs.quickstart [key=value ...]      (what `make quickstart` runs)

The overrides apply to the pretraining config (jobs/configs/pretrain-quickstart.yaml), e.g.
train.max_steps=300. Everything runs on the embedded default: a local Ray cluster started for the
job (or the one RAY_ADDRESS names), files under state/, and a local MLflow store (or
$MLFLOW_TRACKING_URI). Both steps are re-runnable: a finished dataset is reused, and a finished or
interrupted pretraining run resumes from its last checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs import pretrain, tokenize
from jobs.common import cli
from jobs.common.config import load_config
from jobs.common.ray_session import ensure_ray, set_verbose

CONFIGS = Path(__file__).resolve().parent / "configs"


def quickstart(overrides: list[str]) -> int:
    dataset_config = load_config(tokenize.TokenizeConfig, str(CONFIGS / "tokenize-quickstart.yaml"))
    pretrain_config = load_config(pretrain.PretrainConfig, str(CONFIGS / "pretrain-quickstart.yaml"),
                                  [f"data.dataset={dataset_config.output}", *overrides])
    pretrain.validate(pretrain_config)  # before tokenising: a bad override costs seconds
    # Start (or join) the cluster sized for the pretraining step that follows tokenisation.
    ensure_ray(local_num_cpus=pretrain.required_cpus(pretrain_config))
    print("== 1/2  tokenise the quickstart set (rCRS, real; three generated primate-like genomes)", flush=True)
    print(tokenize.summary(tokenize.run(dataset_config)), flush=True)
    print("== 2/2  pretrain the debug flavour (2 workers, expert parallelism 2, ZeRO-2)", flush=True)
    print(pretrain.summary(pretrain.run(pretrain_config)), flush=True)
    return cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = cli.parser("jobs.quickstart", __doc__, takes_config=False).parse_args(argv)
    set_verbose(args.verbose)
    return cli.guarded(lambda: quickstart(args.overrides), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
