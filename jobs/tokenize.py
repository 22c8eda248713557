"""Tokenise primate genomes into a dataset of Parquet shards (ARCHITECTURE.md, Contracts 1-3).

    python -m jobs.tokenize --config jobs/configs/tokenize-quickstart.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tokenize --config <yaml> [key=value ...]

The config is checked completely (keys, groups, the inputs list, the output) before any Ray
work; a finished dataset with the same config is left alone unless force=true.
"""

from __future__ import annotations

import sys

from jobs.config import ConfigError, parse_job_args
from jobs.fasta import InputError
from jobs.tokenization import TokenizeConfig, run, summary


def main(argv: list[str] | None = None) -> int:
    config = parse_job_args(TokenizeConfig, __doc__, argv)
    try:
        manifest = run(config)
    except (ConfigError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(manifest), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
