"""The one command line of every job: `python -m jobs.<name> --config file.yaml [dotted.key=value ...]`.

The config is loaded and checked whole before the job's `run` sees it. Exit codes, the same for
every job: 0 done; 2 bad input (a config key, an input file, an unreachable service), said in
one line that names it; 1 the run failed; 130 interrupted with its state saved (the same command
continues it). `--verbose` brings back Ray's own INFO chatter and the traceback of a failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from jobs.common.config import load_config
from jobs.common.errors import BadInput, Interrupted
from jobs.common.ray_session import set_verbose

Config = TypeVar("Config", bound=BaseModel)
Result = TypeVar("Result")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _always(result: Any) -> bool:
    return True


@dataclass(frozen=True)
class Job(Generic[Config, Result]):
    """What the command line needs of a job: its description (the entry module's docstring,
    printed by --help), its config type, what runs it and what it prints at the end."""

    name: str
    description: str
    config: type[Config]
    run: Callable[[Config], Result]
    summary: Callable[[Result], str]
    succeeded: Callable[[Result], bool] = _always  # a run can end without an error and still fail


def parser(name: str, description: str, takes_config: bool = True) -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(prog=f"python -m {name}", description=description,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    if takes_config:
        command.add_argument("--config", help="YAML config (path or any fsspec URL); without it, the job's defaults")
    command.add_argument("--verbose", action="store_true",
                         help="show Ray's own INFO logs and progress messages, and the traceback of a failure")
    command.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides on top of the config, values in YAML: train.lr=3e-4 seq_len=1024")
    return command


def guarded(work: Callable[[], int], verbose: bool) -> int:
    """Run `work`, turning what it raises into one line on stderr and the exit code for it."""
    try:
        return work()
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except (Interrupted, KeyboardInterrupt) as interrupted:
        print(f"interrupted: {interrupted or 'run the same command again to continue'}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:
        if verbose:
            traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        hint = "" if verbose else " (--verbose shows the traceback)"
        print(f"error: the run failed: {type(error).__name__}: {first_line}{hint}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def main(job: Job, argv: Sequence[str] | None = None) -> int:
    args = parser(job.name, job.description).parse_args(argv)
    set_verbose(args.verbose)

    def work() -> int:
        result = job.run(load_config(job.config, args.config, args.overrides))
        print(job.summary(result), flush=True)
        return EXIT_OK if job.succeeded(result) else EXIT_FAILED

    return guarded(work, args.verbose)
