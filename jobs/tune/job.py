"""The tune job: Ray Tune + Optuna over pretraining settings, Gengram's window size and layers first.

A trial is a whole, short jobs.pretrain run (Ray Train + DeepSpeed with its own workers),
started from a Tune function trainable: Train V2 inside Tune. Each evaluation's val_loss
reaches Tune through Ray's Train->Tune report callback; OptunaSearch (TPE) proposes values
and ASHA stops trials that trail at an evaluation. Every trial trains on the same data for
the same number of steps and evaluates the same validation rows, so their val losses compare.

State, so that an interrupted search continues where it stopped: the Tune experiment under
`<storage>/<name>` (the trials' Train checkpoints in its `train/`), the Optuna study in an
SQL database (SQLite by default), and in MLflow a parent run for the search with one child
run per trial (the pretraining job's own run, tagged mlflow.parentRunId). At the end,
jobs.tune.report writes the trial table, plots and best config into the parent run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import optuna
from mlflow.tracking import MlflowClient
from ray import tune

from jobs.common import tracking
from jobs.common.config import ConfigError, config_hash, config_to_dict
from jobs.common.errors import Interrupted
from jobs.common.ray_session import ensure_ray
from jobs.common.storage import absolute, filesystem, join, pyarrow_filesystem
from jobs.common.tracking import RUN_NAME_TAG
from jobs.pretrain import check_dataset
from jobs.pretrain import required_cpus as pretrain_cpus
from jobs.tune.config import METRIC, TuneConfig
from jobs.tune.plan import TunePlan, make_plan
from jobs.tune.report import report
from jobs.tune.trials import TrialRow, outcome_counts, run_trial
from jobs.tune.tuner import new_tuner


@dataclass
class TuneResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    study_storage: str
    rows: list[TrialRow]
    best: TrialRow | None
    artifacts: list[str]
    wall_s: float
    restored: bool


TUNE_HASH_TAG = "tune.config_hash"


def tune_hash(config: TuneConfig) -> str:
    """What a restored search must share with the one it continues (everything but `fresh`)."""
    return config_hash({key: value for key, value in config_to_dict(config).items() if key != "fresh"})


def required_cpus(plan: TunePlan) -> int:
    """Logical CPUs for a local cluster: max_concurrent_trials trials, each its driver and its run's needs."""
    per_trial = plan.config.trial.driver_cpus + pretrain_cpus(plan.trial_base_config)
    return math.ceil(plan.config.search.max_concurrent_trials * per_trial)


def continues_earlier_search(plan: TunePlan, client, experiment_id: str, study_url: str, storage_path: str,
                             storage_fs) -> bool:
    """Whether a saved Tune experiment of this name is there to restore. fresh=true first removes
    it and the Optuna study and sets earlier MLflow runs of the name aside; without it, a new
    search refuses to start over such leftovers of an earlier one."""
    config = plan.config
    experiment_fs, experiment_path = filesystem(plan.experiment_url,
                                                plan.base_config.storage_options(plan.experiment_url))
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.name}'")
    study_exists = config.name in optuna.study.get_all_study_names(study_url)
    if config.fresh:
        if experiment_fs.exists(experiment_path):
            experiment_fs.rm(experiment_path, recursive=True)
        if study_exists:
            optuna.delete_study(study_name=config.name, storage=study_url)
        for parent in parents:  # kept in MLflow, no longer found by this name
            client.set_tag(parent.info.run_id, RUN_NAME_TAG, f"{config.name}@{parent.info.run_id}")
        return False
    if tune.Tuner.can_restore(join(storage_path, config.name), storage_filesystem=storage_fs):
        if not parents or parents[0].data.tags.get(TUNE_HASH_TAG) != tune_hash(config):
            raise ConfigError(f"search {config.name!r} was started with a different config (or its MLflow run is "
                              "gone); rerun it with the config it started with, or set fresh=true to start over")
        return True
    leftovers = [f"Optuna study {config.name!r} in {study_url}"] * study_exists
    leftovers += [f"MLflow run {parent.info.run_id}" for parent in parents]
    if leftovers:
        raise ConfigError(f"search {config.name!r} has no Tune experiment under {config.storage} to continue, but "
                          f"{' and '.join(leftovers)} exist from an earlier one; set fresh=true to start over, or "
                          "choose another name")
    return False


def run(config: TuneConfig) -> TuneResult:
    """Check the search, then run it (or continue it) on the Ray cluster and report it in MLflow."""
    started = time.monotonic()
    plan = make_plan(config)
    base = plan.base_config
    plan.tracking_uri = tracking.resolve_tracking_uri(base.tracking.uri)
    tracking.preflight(plan.tracking_uri, base.tracking.preflight_timeout_s)
    check_dataset(base, plan.model)
    client = MlflowClient(plan.tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, base.tracking.experiment, base.tracking.artifact_root)
    storage_path, storage_fs = pyarrow_filesystem(absolute(config.storage), base.storage_options(config.storage))
    study_url = plan.study_url
    restoring = continues_earlier_search(plan, client, experiment_id, study_url, storage_path, storage_fs)

    params = tracking.params_from_config(config_to_dict(config))
    tags = {TUNE_HASH_TAG: tune_hash(config), "tune.experiment_path": plan.experiment_url,
            "optuna.storage": study_url, "optuna.study_name": config.name, **tracking.ray_job_tags()}
    plan.parent_run_id, _ = tracking.start_or_resume_run(client, experiment_id, config.name, params, tags)
    print(f"MLflow parent run {plan.parent_run_id} in {plan.tracking_uri}; "
          f"{'restoring' if restoring else 'starting'} Tune experiment {plan.experiment_url}", flush=True)
    try:
        ensure_ray(local_num_cpus=required_cpus(plan))
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": config.trial.driver_cpus})
        if restoring:
            # Finished trials stay as they are; unfinished ones resume (their Train runs from
            # their last checkpoints); the searcher, scheduler and callbacks come back as saved.
            tuner = tune.Tuner.restore(join(storage_path, config.name), trainable=trainable,
                                       storage_filesystem=storage_fs)
        else:
            tuner = new_tuner(plan, trainable, experiment_id, storage_path, storage_fs)
        grid = tuner.fit()
        if grid.num_terminated + grid.num_errors < config.search.num_samples:
            raise Interrupted(f"search {config.name!r} was interrupted; run the same command again to continue it")
        rows, best, artifacts = report(plan, grid, client, experiment_id)
    except Interrupted:
        client.set_terminated(plan.parent_run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(plan.parent_run_id, "FAILED")
        raise
    client.set_terminated(plan.parent_run_id, "FINISHED")
    return TuneResult(config.name, plan.parent_run_id, plan.tracking_uri, plan.experiment_url, study_url,
                      rows, best, artifacts, time.monotonic() - started, restoring)


def summary(result: TuneResult) -> str:
    lines = ["", f"Search {result.name} finished{' (restored)' if result.restored else ''} "
             f"in {result.wall_s:.0f} s.",
             f"  MLflow parent run: {result.parent_run_id} ({result.tracking_uri})",
             f"  Tune experiment:   {result.experiment_path}",
             f"  Optuna study:      {result.name} in {result.study_storage}"]
    counts = outcome_counts(result.rows)
    lines.append("  trials:            " + ", ".join(f"{count} {name.replace('_', ' ')}"
                                                    for name, count in counts.items()))
    if result.best:
        values = ", ".join(f"{name}={value}" for name, value in result.best.params.items())
        lines.append(f"  best trial:        {result.best.trial_id}  {METRIC} {result.best.val_loss:.4f}  ({values})")
        lines.append("  best config:       artifact best_config.yaml of the parent run")
    else:
        lines.append("  no trial ran its whole budget")
    return "\n".join(lines)
