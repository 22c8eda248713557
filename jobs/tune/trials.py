"""One trial: a short pretraining run as a child MLflow run, its evaluations reported to Tune, and
its outcome recorded on its run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from jobs.common.storage import PROJECT_HOME_VARIABLE
from jobs.common.tracking import RUN_NAME_TAG
from jobs.pretrain import run as pretrain
from jobs.tune.plan import TunePlan


class ReportEvaluationsToTune(TuneReportCallback):
    """Ray's Train->Tune report callback for the evaluations before a run's last step.

    A checkpoint between evaluations reports the previous evaluation's val_loss, which ASHA
    must not compare with other trials' at this step. And ASHA stops a trial as soon as Tune
    sees it reach max_t, which would end the trial's actor while the pretraining job still
    exports its final model and closes its MLflow run: the trial function reports the final
    metrics itself once the job has returned."""

    def __init__(self, eval_every: int):
        super().__init__()
        self.eval_every = eval_every

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics[0]["step"] % self.eval_every == 0 and not metrics[0].get("final"):
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], plan: TunePlan) -> None:
    """One trial: a short pretraining run with the sampled values, as a child of the search's MLflow run."""
    # Tune starts trials in their own directory: resolve relative paths where the driver does.
    os.environ[PROJECT_HOME_VARIABLE] = plan.home
    trial_id = tune.get_context().get_trial_id()
    result = pretrain(plan.trial_config(params, trial_id), parent_run_id=plan.parent_run_id,
                      train_callbacks=[ReportEvaluationsToTune(plan.config.trial.eval_every)])
    # Also the only report when a restored search re-runs a trial whose training had finished.
    tune.report(result.metrics)


@dataclass
class TrialRow:
    trial_id: str
    outcome: str
    params: dict[str, Any]  # as sampled (labels for choices)
    step: int | None
    val_loss: float | None
    wall_s: float | None  # the trial function's time, as Tune counts it
    train_s: float | None
    run_id: str | None

    @property
    def overhead_s(self) -> float | None:
        return None if self.wall_s is None or self.train_s is None else self.wall_s - self.train_s


OUTCOME_TAG = "tune.outcome"


OUTCOMES = ("completed", "stopped_early", "error")


def outcome_counts(rows: list[TrialRow]) -> dict[str, int]:
    return {name: sum(row.outcome == name for row in rows) for name in OUTCOMES}


def outcome(result: Mapping[str, Any] | None, error: bool) -> str:
    if error:
        return "error"
    return "completed" if (result or {}).get("final") else "stopped_early"


def child_runs(client, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The search's trial runs by run name."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=50_000)
    return {run.data.tags.get(RUN_NAME_TAG): run for run in runs}


def close_trial_run(client, run, trial_id: str, trial_outcome: str) -> None:
    """Tag a trial's run with its outcome; end it if Tune ended the trial before the pretraining
    job could (ASHA stops a trial by ending its actor)."""
    client.set_tag(run.info.run_id, "tune.trial_id", trial_id)
    client.set_tag(run.info.run_id, OUTCOME_TAG, trial_outcome)
    status = {"stopped_early": "KILLED", "error": "FAILED"}.get(trial_outcome)
    if status and client.get_run(run.info.run_id).info.status != status:
        client.set_terminated(run.info.run_id, status)


class CloseTrialRuns(tune.Callback):
    """Closes each trial's MLflow run as Tune ends the trial (pickled with the experiment: keeps no client)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, name: str):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.name = parent_run_id, name

    def _close(self, trial, error: bool) -> None:
        client = MlflowClient(self.tracking_uri)
        run = child_runs(client, self.experiment_id, self.parent_run_id).get(f"{self.name}-{trial.trial_id}")
        if run is not None:
            close_trial_run(client, run, trial.trial_id, outcome(trial.last_result, error))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, error=True)
