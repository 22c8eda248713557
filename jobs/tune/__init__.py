"""The tune job (`python -m jobs.tune`): Ray Tune + OptunaSearch + ASHA over Gengram's window sizes
and layer placements (and any pretraining key), each trial a short `jobs.pretrain` run.

Public API: the config, `run` and its summary. The rest (space, plan, trials, tuner, report) is internal.
"""

from jobs.tune.config import TuneConfig
from jobs.tune.job import TuneResult, run, summary

__all__ = ["TuneConfig", "TuneResult", "run", "summary"]
