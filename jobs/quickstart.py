"""The quickstart: tokenise the quickstart genomes, pretrain the debug flavour, show where to look.

    python -m jobs.quickstart [pretrain.key=value ...]      (what `make quickstart` runs)

Everything runs on the embedded default: a local Ray cluster started for the job (or the one
RAY_ADDRESS names), files under state/, and a local MLflow store (or $MLFLOW_TRACKING_URI).
Both steps are re-runnable: a finished dataset is reused, and a finished or interrupted
pretraining run resumes from its last checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cluster import ensure_ray
from jobs.config import ConfigError, load_config
from jobs.pretrain import required_cpus, summary
from jobs.pretrain import run as pretrain
from jobs.pretrain_config import PretrainConfig
from jobs.tokenization import TokenizeConfig
from jobs.tokenization import run as tokenize
from jobs.tokenization import summary as dataset_summary

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str]) -> int:
    try:
        dataset_config = load_config(TokenizeConfig, str(CONFIGS / "tokenize-quickstart.yaml"))
        pretrain_config = load_config(PretrainConfig, str(CONFIGS / "pretrain-quickstart.yaml"),
                                      [f"data.dataset={dataset_config.output}", *argv])
        # Start (or join) the cluster sized for the pretraining step that follows tokenisation.
        ensure_ray(local_num_cpus=required_cpus(pretrain_config))
        print("== 1/2  tokenise the quickstart set (rCRS, real; three generated primate-like genomes)", flush=True)
        print(dataset_summary(tokenize(dataset_config)), flush=True)
        print("== 2/2  pretrain the debug flavour (2 workers, expert parallelism 2, ZeRO-2)", flush=True)
        print(summary(pretrain(pretrain_config)), flush=True)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
