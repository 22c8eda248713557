"""Ray Tune's parts as this job uses them: OptunaSearch that knows a stopped trial was pruned, ASHA
whose rungs survive a restore, trial directories named by trial id, and the Tuner itself."""

from __future__ import annotations

import json
from typing import Any

import optuna
from ray import tune
from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.search.optuna import OptunaSearch

from jobs.tune.config import METRIC
from jobs.tune.plan import TunePlan
from jobs.tune.trials import CloseTrialRuns


class BudgetAwareOptunaSearch(OptunaSearch):
    """Tells Optuna that a trial ASHA stopped was PRUNED (at its last val_loss), not COMPLETE: that
    loss came after fewer steps and does not compare, and Optuna's best trial and parameter
    importances take COMPLETE trials only."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = result is not None and not error and not result.get("final")
        if stopped_early:
            # The result ASHA stopped on comes here, not to on_trial_result: record it, so that
            # the pruned trial keeps it as its value.
            self.on_trial_result(trial_id, result)
        super().on_trial_complete(trial_id, None if stopped_early else result, error)


class ResumableASHAScheduler(tune.schedulers.ASHAScheduler):
    """ASHA whose rungs survive Tuner.restore. Tune restores a searcher's state but not a
    scheduler's, so a restored search would judge its remaining trials only against each other:
    each trial Tune re-adds from a saved experiment replays the results it had reported."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.run_metadata.last_result:  # a restored trial that had reported; new ones have not
            for result in saved_results(trial):
                self.on_trial_result(tune_controller, trial, result)  # records the rungs; decisions were made then


def saved_results(trial) -> list[dict[str, Any]]:
    """The results Tune logged for a trial (its result.json, one JSON object a line)."""
    path = f"{trial.storage.trial_fs_path}/{EXPR_RESULT_FILE}"
    try:
        with trial.storage.storage_filesystem.open_input_stream(path) as handle:
            lines = handle.readall().decode().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def trial_dirname(trial) -> str:
    """A trial's directory is its id: the report matches Tune's results to MLflow runs by it."""
    return trial.trial_id


def new_tuner(plan: TunePlan, trainable, experiment_id: str, storage_path: str, storage_fs) -> tune.Tuner:
    config = plan.config
    searcher = BudgetAwareOptunaSearch(
        space={dim.name: dim.distribution() for dim in plan.dims}, metric=METRIC, mode="min",
        points_to_evaluate=plan.points, sampler=optuna.samplers.TPESampler(seed=config.search.seed),
        study_name=config.name, storage=optuna.storages.RDBStorage(plan.study_url),
    )
    scheduler = ResumableASHAScheduler(
        time_attr="step", metric=METRIC, mode="min", max_t=config.trial.max_steps,
        grace_period=config.asha.grace_period, reduction_factor=config.asha.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=config.search.num_samples,
                                    max_concurrent_trials=config.search.max_concurrent_trials,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=config.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                  callbacks=[CloseTrialRuns(plan.tracking_uri, experiment_id, plan.parent_run_id,
                                                            config.name)]),
    )
