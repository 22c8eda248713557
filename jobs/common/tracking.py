"""MLflow plumbing shared by the jobs: preflight, runs that resume by name, secret-free params,
metric plots, and the final model in the registry.

Only the driver and rank 0 of a Train run talk to MLflow; every call here takes an explicit
run id so that a worker can log into the run its driver created.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import Field

from jobs.common.config import StrictModel, flatten
from jobs.common.errors import BadInput
from jobs.common.storage import absolute, absolute_sqlite

RUN_NAME_TAG = "gengram.run_name"
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|private|session|access_key|^key$)", re.I)
REDACTED = "<redacted>"
# MLflow's param values are capped (6000 chars in 3.x); longer values are cut, not refused.
MAX_PARAM_CHARS = 6000


class TrackingUnavailable(BadInput):
    """The tracking server does not answer; raised before any compute is spent."""


LOCAL_STORE = "sqlite:///state/mlflow/mlflow.db"


class TrackingSection(StrictModel):
    """A job config's `tracking` section; each job subclasses it to name its own default experiment."""

    uri: str | None = None  # unset: $MLFLOW_TRACKING_URI, else sqlite:///state/mlflow/mlflow.db
    artifact_root: str = "state/mlflow/artifacts"  # where a local store keeps artifacts (a server keeps its own)
    experiment: str
    preflight_timeout_s: float = Field(10, gt=0)


def resolve_tracking_uri(uri: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI (the local stack sets it for its jobs), else a
    local SQLite store, made absolute so that Ray workers, whose cwd differs, reach the same store."""
    return absolute_sqlite(uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_STORE)


def _short_retries(timeout_s: float):
    """MLflow retries a dead server for minutes by default; a preflight should fail in seconds."""
    return mock.patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s)))})


def preflight(uri: str, timeout_s: float) -> None:
    """Fail fast, with the URI named, if the tracking store cannot be reached."""
    with _short_retries(timeout_s):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as error:
            raise TrackingUnavailable(
                f"MLflow tracking store {uri} is not reachable ({type(error).__name__}: {error}). "
                "Start it (platform/local-stack up) or set tracking.uri."
            ) from None


def redact(data: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a nested mapping with secret-looking values replaced, so they never reach MLflow."""
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            clean[key] = redact(value)
        elif SECRET_KEY.search(str(key)):
            clean[key] = REDACTED
        else:
            clean[key] = value
    return clean


def params_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value)[:MAX_PARAM_CHARS] for key, value in flatten(redact(config)).items()}


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def ray_job_tags() -> dict[str, str]:
    tags = {}
    submission_id = os.environ.get("RAY_JOB_SUBMISSION_ID")
    if submission_id:
        tags["ray.job_submission_id"] = submission_id
    try:
        import ray

        if ray.is_initialized():
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # tags are best effort; a missing Ray context must not fail a run
        pass
    return tags


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if artifact_root and not client.tracking_uri.startswith(("http://", "https://", "databricks")):
        # A local store would otherwise put artifacts in ./mlruns of whatever process logs first.
        location = Path(absolute(artifact_root)).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_or_resume_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """The run named `run_name` in the experiment: the existing one when a job is re-run
    (so a resumed training continues its curves), else a new one. Returns (run_id, resumed)."""
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    all_tags = {RUN_NAME_TAG: run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        resumed = True
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        resumed = False
    for key, value in all_tags.items():
        client.set_tag(run_id, key, value)
    logged = client.get_run(run_id).data.params
    log_params(client, run_id, {key: value for key, value in params.items() if key not in logged})
    return run_id, resumed


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Params are immutable in MLflow: give only ones the run does not hold yet."""
    batch = [mlflow.entities.Param(key, value) for key, value in params.items()]
    for start in range(0, len(batch), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=batch[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    entries = [mlflow.entities.Metric(key, float(value), mlflow.utils.time.get_current_time_millis(), step)
               for key, value in metrics.items()]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])


def metric_history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    by_step = {m.step: m.value for m in history}  # a resumed run may log a step twice: keep the last
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
