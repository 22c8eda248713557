"""The experiment job (`python -m jobs.experiment`): the paper's claims at laptop or cluster scale, as a
resumable pipeline of the other jobs (generate -> tokenize -> pretrain -> tune -> evaluate -> report) with
positive and negative controls.

Public API: the config, `make_plan` (what would run), `run` and what it returns. The rest (report) is
internal.
"""

from jobs.experiment.config import ExperimentConfig
from jobs.experiment.job import ExperimentResult, run, summary
from jobs.experiment.plan import Plan, Step, describe, make_plan

__all__ = ["ExperimentConfig", "ExperimentResult", "Plan", "Step", "describe", "make_plan", "run", "summary"]
