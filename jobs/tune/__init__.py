"""The tune job (`python -m jobs.tune`): Ray Tune + OptunaSearch + ASHA over Gengram's window sizes
and layer placements (and any pretraining key), each trial a short `jobs.pretrain` run.

Public API: the config, `run` and its summary. The rest (space, plan, trials, tuner, report) is internal.
"""

from jobs.tune.config import TuneConfig
from jobs.tune.job import TuneResult, required_cpus, run, summary
from jobs.tune.plan import make_plan

__all__ = ["TuneConfig", "TuneResult", "make_plan", "required_cpus", "run", "summary"]
