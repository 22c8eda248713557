"""jobs.tune on CPU: a real Ray Tune + Optuna search whose trials are real pretraining runs (Ray
Train, DeepSpeed, debug flavour) on the quickstart dataset, tracked in a real MLflow server.

The end-to-end search is run the way users run it, `python -m jobs.tune` as a driver joining the
test's Ray cluster; it is killed once two trials have finished, and run again. One search covers
the tracking, the report, ASHA's early stopping and the restore: a trial costs a minute or two here.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pyarrow.fs
import pytest
import yaml
from conftest import ROOT, clean_env
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler

from jobs.common.config import load_config
from jobs.common.tracking import RUN_NAME_TAG
from jobs.pretrain.config import PretrainConfig
from jobs.tokenize import TokenizeConfig
from jobs.tokenize import run as tokenize
from jobs.tune import TuneConfig
from jobs.tune.config import PAPER_WINDOWS
from jobs.tune.plan import make_plan
from jobs.tune.space import label
from jobs.tune.tuner import ResumableASHAScheduler

CONFIGS = ROOT / "jobs" / "configs"
QUICKSTART = CONFIGS / "tune-quickstart.yaml"


def tune_cli(config: Path | str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--config", str(config), *overrides]


def test_paper_sweep_is_valid_for_its_model():
    """The GPU config's whole space (18 windows x 17 layer placements) passes the checks here."""
    plan = make_plan(load_config(TuneConfig, str(CONFIGS / "tune-paper-windows.yaml")))
    window, layers = plan.dims
    assert list(window.choices) == [label(w) for w in PAPER_WINDOWS] and window.value("none") is None
    assert list(layers.choices)[:12] == [str(i) for i in range(1, 13)]
    assert layers.value("3,6,10") == [3, 6, 10] and layers.value("10") == [10]
    assert plan.points[0] == {"window_size": "21", "layers": "10"}
    trial = plan.trial_config({"window_size": "none", "layers": "9,10,11,12"}, "t1")
    gengram = trial.model.overrides["gengram"]
    assert gengram["window_size"] is None and trial.model.overrides["gengram_layers"] == [9, 10, 11, 12]
    assert trial.train.max_steps == 600 and trial.run_name == "paper-windows-moe-1.2b-t1"
    best = plan.best_config({"window_size": "15", "layers": "3,10"})
    assert best.train.max_steps == 2400 and best.model.overrides["gengram_layers"] == [3, 10]


def test_invalid_space_fails_before_any_trial_starts(tmp_path):
    result = subprocess.run(
        tune_cli(QUICKSTART, "space.window_size=[4, 21]", "space.layers=['2', '3,5']", "search.points_to_evaluate=[]",
                 f"storage={tmp_path}"),
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "space.window_size=4: " in result.stderr and "largest n-gram size 6" in result.stderr
    assert "space.layers=3,5: " in result.stderr and "must lie in 1..4" in result.stderr
    assert "space.window_size=21" not in result.stderr  # only the bad values are named
    assert "Ray instance" not in result.stdout + result.stderr  # no cluster was started or joined
    assert not list(tmp_path.iterdir())


def test_asha_rungs_survive_a_restore(tmp_path):
    """Tune restores no scheduler state; the search's ASHA replays the results restored trials had
    logged, so a trial started after a restore is judged against them."""

    def trial(trial_id: str, results: list[dict]):
        directory = tmp_path / trial_id
        directory.mkdir()
        (directory / "result.json").write_text("".join(json.dumps(result) + "\n" for result in results))
        storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(directory))
        metadata = SimpleNamespace(last_result=results[-1] if results else {})
        return SimpleNamespace(trial_id=trial_id, run_metadata=metadata, storage=storage)

    restored = [trial("a", [{"step": 2, "val_loss": 1.7}, {"step": 4, "val_loss": 1.6}]),
                trial("b", [{"step": 2, "val_loss": 1.8}])]
    for scheduler_class in (ASHAScheduler, ResumableASHAScheduler):
        scheduler = scheduler_class(time_attr="step", metric="val_loss", mode="min", max_t=8, grace_period=2,
                                    reduction_factor=2)
        for earlier in restored:
            scheduler.on_trial_add(None, earlier)
        new = trial(f"new-{scheduler_class.__name__}", [])
        scheduler.on_trial_add(None, new)
        decision = scheduler.on_trial_result(None, new, {"step": 2, "val_loss": 2.0})
        assert decision == ("STOP" if scheduler_class is ResumableASHAScheduler else "CONTINUE")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_cluster) -> str:
    """The quickstart dataset, tokenised by the real job into a temporary directory."""
    output = str(tmp_path_factory.mktemp("data") / "quickstart")
    config = load_config(TokenizeConfig, str(CONFIGS / "tokenize-quickstart.yaml"),
                         [f"output={output}", f"assemblies={ROOT / 'jobs' / 'assemblies' / 'quickstart.yaml'}"])
    tokenize(config)
    return output


# Four points in the order they start, two at a time; ASHA compares trials at steps 2 and 4. The
# two lr 3e-4 trials come first: whichever reaches a step first goes on, so one of them runs to
# the end (the third trial starts too late to overtake it). The search is stopped once both have
# ended, and the restored search judges the other two against the values they recorded (its ASHA
# replays them): lr 1e-3 beats them and runs to the end, lr 1e-5 trails them and stops at step 2.
# So however the trials interleave, at least one stops early and at least two finish.
POINTS = [
    {"window_size": 6, "layers": "1", "train.lr": 3.0e-4},
    {"window_size": 12, "layers": "2", "train.lr": 3.0e-4},
    {"window_size": 21, "layers": "2,3", "train.lr": 1.0e-3},
    {"window_size": "none", "layers": "4", "train.lr": 1.0e-5},
]


def terminated_trials(experiment: Path) -> set[str]:
    """Trials Tune's saved experiment state records as finished."""
    done = set()
    for path in glob.glob(str(experiment / "experiment_state-*.json")):
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
def test_search_is_tracked_and_survives_an_interruption(dataset, mlflow_server, ray_cluster, tmp_path):
    config = yaml.safe_load(QUICKSTART.read_text())
    config.update(name="search", storage=str(tmp_path / "tune"))
    config["pretrain"]["overrides"].update({
        "data.dataset": dataset, "tracking.uri": mlflow_server.tracking_uri, "tracking.experiment": "test-tune",
        "train.min_lr": 1.0e-6,
    })
    config["space"]["params"]["train.lr"] = [1.0e-3, 3.0e-4, 1.0e-5]
    config["search"].update(num_samples=4, points_to_evaluate=POINTS,
                            study_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(config))
    max_steps = config["trial"]["max_steps"]

    # The driver joins this test's cluster, as under `ray job submit`; killing it ends its trials.
    env = clean_env(RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, RAY_AUTH_MODE="token")
    experiment = tmp_path / "tune" / "search"
    client = MlflowClient(mlflow_server.tracking_uri)

    def trial_runs() -> dict[str, object]:
        """Child runs of trials Tune has ended, by trial id."""
        runs = client.search_runs([client.get_experiment_by_name("test-tune").experiment_id])
        return {run.data.tags["tune.trial_id"]: run for run in runs if "tune.trial_id" in run.data.tags}

    def last_logged(run) -> int:
        return max(m.timestamp for key in ("loss", "val_loss") for m in client.get_metric_history(run.info.run_id, key))

    started = time.monotonic()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(tune_cli(config_path), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(terminated_trials(experiment)) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    killed_ms = time.time() * 1000
    finished_before = terminated_trials(experiment)
    assert len(finished_before) >= 2, "the first two trials did not finish before the search was stopped"
    assert finished_before <= set(trial_runs())

    second = subprocess.run(tune_cli(config_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "restoring Tune experiment" in second.stdout

    # Every trial ran once, with its own child run; the finished ones were not run again.
    runs = trial_runs()
    assert len(runs) == 4 and terminated_trials(experiment) == set(runs)
    for trial_id in finished_before:  # a trial run again would log its steps again
        assert last_logged(runs[trial_id]) < killed_ms, trial_id
    assert any(last_logged(run) > killed_ms for run in runs.values()), "no trial continued after the restore"
    study = optuna.load_study(study_name="search", storage=config["search"]["study_storage"])
    assert len(study.trials) == 4 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}

    # The parent run and its children.
    experiment_id = client.get_experiment_by_name("test-tune").experiment_id
    parents = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = 'search'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    assert {run.data.tags["mlflow.parentRunId"] for run in runs.values()} == {parent_id}
    for run in runs.values():
        assert run.data.params["model.flavour"] == "debug" and "model.overrides.gengram.window_size" in run.data.params
        assert client.get_metric_history(run.info.run_id, "val_loss")
    outcomes = {run.data.params["train.lr"]: run.data.tags["tune.outcome"] for run in runs.values()}
    # lr 1e-5 ran after the restore and was judged against the values from before it.
    assert outcomes["1e-05"] == "stopped_early" and outcomes["0.001"] == "completed", outcomes
    completed = [run.data.params["train.lr"] for run in runs.values() if run.data.tags["tune.outcome"] == "completed"]
    assert len(completed) >= 2, completed  # counted per run: two trials share lr 3e-4
    for run in runs.values():
        if run.data.tags["tune.outcome"] == "stopped_early":  # before the budget, and its run says so
            assert run.info.status == "KILLED"
            assert max(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) < max_steps

    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"trials.csv", "trials.md", "best_config.yaml", "plots/val_loss_vs_window_size.png",
            "plots/val_loss_vs_layers.png", "plots/optuna_param_importances.png"} <= artifacts
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, dst_path=str(tmp_path / "report"),
                                                          tracking_uri=mlflow_server.tracking_uri))
    best = load_config(PretrainConfig, str(downloaded / "best_config.yaml"))  # ready to run
    assert best.train.lr == 1.0e-3 and best.model.overrides["gengram"]["window_size"] == 21
    assert best.model.overrides["gengram_layers"] == [2, 3]
    assert best.train.max_steps == load_config(PretrainConfig, str(ROOT / config["pretrain"]["config"])).train.max_steps
    table = (downloaded / "trials.md").read_text()
    best_row = next(line for line in table.splitlines() if "| completed |" in line)
    print(f"\nsearch wall time (interrupted once, then restored): {wall_s:.0f} s\n{table}\n"
          f"{second.stdout[second.stdout.index('Search search finished'):]}")
    assert parents[0].data.tags["tune.best_trial"] in best_row
