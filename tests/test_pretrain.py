"""jobs.pretrain end to end on CPU: real Ray Train, real DeepSpeed (gloo), a real MLflow server
over HTTP, and moto's S3 server for storage. Runs are a few steps of the debug flavour on the
quickstart dataset (real rCRS + generated genomes)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, registered_checkpoints
from mlflow.tracking import MlflowClient

from jobs.common import tracking
from jobs.common.config import ConfigError, load_config
from jobs.common.tracking import RUN_NAME_TAG
from jobs.pretrain import run
from jobs.pretrain.config import PretrainConfig
from jobs.tokenize import TokenizeConfig
from jobs.tokenize import run as tokenize
from model import exported

QUICKSTART = str(ROOT / "jobs" / "configs" / "pretrain-quickstart.yaml")
pytestmark = [pytest.mark.ray, pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_cluster) -> str:
    """The quickstart dataset, tokenised by the real job into a temporary directory."""
    output = str(tmp_path_factory.mktemp("data") / "quickstart")
    config = load_config(TokenizeConfig, str(ROOT / "jobs" / "configs" / "tokenize-quickstart.yaml"),
                         [f"output={output}", f"assemblies={ROOT / 'jobs' / 'assemblies' / 'quickstart.yaml'}"])
    tokenize(config)
    return output


def short_run(dataset: str, tmp_path: Path, tracking_uri: str, *extra: str) -> list[str]:
    """Overrides for a short 2-worker run (ep_size 2, ZeRO-2, as the quickstart)."""
    return [
        f"data.dataset={dataset}",
        f"checkpoint.storage={tmp_path / 'checkpoints'}",
        f"tracking.uri={tracking_uri}",
        "train.log_every=2", "train.eval_every=6", "checkpoint.every=6", "train.eval_batches=2",
        *extra,
    ]


def test_two_workers_with_expert_parallelism_train_and_track(dataset, mlflow_server, ray_cluster, tmp_path):
    overrides = short_run(dataset, tmp_path, mlflow_server.tracking_uri, "run_name=main", "train.max_steps=12",
                          "tracking.registered_model=gengram-test", "tracking.experiment=test-main")
    result = run(load_config(PretrainConfig, QUICKSTART, overrides))
    client = MlflowClient(mlflow_server.tracking_uri)
    run_info = client.get_run(result.run_id)
    assert run_info.info.status == "FINISHED"

    # The loss falls.
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses

    metrics = run_info.data.metrics
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "val_loss",
                "moe/layer1/cv", "moe/layer1/max_over_mean", "moe/layer4/expert3_share",
                "gengram/layer2/gate_mean", "gengram/layer3/gate_open_fraction"):
        assert key in metrics, key
    assert sum(metrics[f"moe/layer2/expert{e}_share"] for e in range(4)) == pytest.approx(1.0)
    assert any(key.startswith("system/") for key in metrics), "MLflow system metrics missing"
    params = run_info.data.params
    assert params["model.flavour"] == "debug" and params["model_resolved.gengram.window_size"] == "21"
    assert params["resources.num_workers"] == "2" and params["model.overrides.ep_size"] == "2"
    tags = run_info.data.tags
    assert tags[RUN_NAME_TAG] == "main" and len(tags["dataset.manifest_hash"]) == 64 and tags["git.commit"]

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    artifacts |= {a.path for folder in ("plots", "final_model") for a in client.list_artifacts(result.run_id, folder)}
    assert {"config.yaml", "deepspeed_config.json", "plots/loss_curves.png", "plots/expert_load.png",
            "final_model/model.pt", "final_model/model_config.json"} <= artifacts
    version = client.search_model_versions("name='gengram-test'")[0]
    assert version.run_id == result.run_id

    # The exported model, read back through MLflow, reproduces the trained engine's logits.
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="final_model",
                                                          dst_path=str(tmp_path / "download")))
    model = exported.load(exported.local(downloaded))
    reference = torch.load(downloaded / "reference.pt")
    with torch.no_grad():
        logits = model(reference["input_ids"], compute_loss=False).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    served = mlflow.pyfunc.load_model(f"models:/gengram-test/{version.version}")
    scores = served.predict({"sequence": ["ACGTACGTNNACGT" * 8, "GATTACA" * 20]})
    assert np.isfinite(scores["loss"]).all()

    # Continued pretraining (the paper's 32k stage): a new run from the exported model, with a
    # longer context, starts at the loss the first run ended with, not at a fresh model's.
    continued = run(load_config(PretrainConfig, QUICKSTART, short_run(
        dataset, tmp_path / "continued", mlflow_server.tracking_uri, "run_name=continued", "train.max_steps=2",
        "train.log_every=1", f"model.init_from={result.model_path}", "model.overrides.max_seq_len=8192",
        "tracking.registered_model=null", "tracking.experiment=test-main")))
    first_loss = min(client.get_metric_history(continued.run_id, "loss"), key=lambda m: m.step).value
    assert abs(first_loss - losses[-1]) < 0.15 < losses[0] - first_loss, (first_loss, losses)
    assert client.get_run(continued.run_id).data.params["model.init_from"] == result.model_path


def train_worker_pids() -> list[int]:
    """Training workers of this test session's own Ray cluster (its raylet is our child), never
    another Ray's on the same machine."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("RayTrainWorker" in part for part in process.cmdline()):
                pids.append(process.pid)
    return pids


def test_killed_worker_resumes_from_its_s3_checkpoint(dataset, mlflow_server, s3_server, ray_cluster, tmp_path):
    bucket = s3_server.make_bucket("pretrain-ft")
    fs = s3_server.filesystem()
    overrides = short_run(dataset, tmp_path, mlflow_server.tracking_uri, "run_name=fault", "train.max_steps=18",
                          f"checkpoint.storage=s3://{bucket}/runs", "tracking.registered_model=null",
                          f"storage=[{{prefix: 's3://{bucket}', endpoint_url: '{s3_server.endpoint_url}'}}]")
    killed: list[int] = []

    def kill_a_worker_after_first_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            fs.invalidate_cache()
            snapshot = f"{bucket}/runs/fault/checkpoint_manager_snapshot.json"
            if fs.exists(snapshot) and registered_checkpoints(fs.cat_file(snapshot).decode()):
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    result = run(load_config(PretrainConfig, QUICKSTART, overrides))
    killer.join(timeout=5)
    assert killed, "no training worker was killed"
    assert result.metrics["step"] == 18
    assert result.metrics["start_step"] in (6, 12)  # resumed from a checkpoint, not from scratch

    client = MlflowClient(mlflow_server.tracking_uri)
    resumed = client.get_metric_history(result.run_id, "resumed_from_step")
    assert resumed and resumed[-1].value == result.metrics["start_step"]
    assert max(m.step for m in client.get_metric_history(result.run_id, "loss")) == 18

    # Checkpoints and the final model are in the bucket and come back from it, and MLflow logged
    # the bucket's final model (through a local copy: MLflow logs local files).
    assert result.model_path == f"{bucket}/runs/fault/final_model"
    logged = Path(client.download_artifacts(result.run_id, "final_model", str(tmp_path / "logged")))
    assert sorted(p.name for p in logged.iterdir()) == sorted(posixpath.basename(p) for p in fs.ls(result.model_path))
    assert (logged / "model.pt").read_bytes() == fs.cat_file(f"{result.model_path}/model.pt")
    assert fs.glob(f"{bucket}/runs/fault/checkpoint_*/engine/mp_rank_00_model_states.pt")
    with fs.open(f"{result.model_path}/model.pt", "rb") as handle:
        state = torch.load(handle, weights_only=True)
    with fs.open(f"{result.model_path}/reference.pt", "rb") as handle:
        reference = torch.load(handle)
    model = exported.load(lambda name, mode: fs.open(f"{result.model_path}/{name}", mode))
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(reference["input_ids"], compute_loss=False).logits, reference["logits"],
                                   rtol=1e-5, atol=1e-5)


def pretrain_cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "jobs.pretrain", "--config", QUICKSTART, *overrides]


def test_rerunning_a_stopped_run_continues_from_its_last_checkpoint(dataset, mlflow_server, tmp_path):
    # Checkpoints every 4 of 12 steps, evaluations at 4, 8 and 12: at least one of each after the resume.
    cadence = ("train.max_steps=12", "checkpoint.every=4", "train.eval_every=4", "tracking.registered_model=null",
               "tracking.experiment=test-rerun")
    command = pretrain_cli(*short_run(dataset, tmp_path, mlflow_server.tracking_uri, "run_name=rerun", *cadence))
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    snapshot = tmp_path / "checkpoints" / "rerun" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (
        snapshot.exists() and registered_checkpoints(snapshot.read_text())
    ):
        assert first.poll() is None, "the first run ended before it was stopped"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait(timeout=60)

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step" in second.stdout + second.stderr

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("test-rerun")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = 'rerun'")
    assert len(runs) == 1, "a rerun must continue the same MLflow run"
    resumed = client.get_metric_history(runs[0].info.run_id, "resumed_from_step")
    assert resumed and resumed[-1].value >= 4
    assert max(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")) == 12

    # The resumed run trained on the very batches an uninterrupted one does: same curves after the resume.
    reference = pretrain_cli(*short_run(dataset, tmp_path, mlflow_server.tracking_uri, "run_name=uninterrupted",
                                        *cadence))
    done = subprocess.run(reference, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    uninterrupted = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = 'uninterrupted'")[0]
    for key in ("loss", "val_loss"):
        steps, values = tracking.metric_history(client, runs[0].info.run_id, key)
        expected = dict(zip(*tracking.metric_history(client, uninterrupted.info.run_id, key), strict=True))
        after = [(s, v) for s, v in zip(steps, values, strict=True) if s > resumed[-1].value]
        assert after and all(v == pytest.approx(expected[s], abs=1e-5) for s, v in after), (key, after, expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.global_batch_size=6"], "train.global_batch_size=6 is not divisible"),
        (["resources.num_workers=3", "train.global_batch_size=12"],
         "ep_size=2 does not divide resources.num_workers=3"),
        (["model.overrides.max_seq_len=512"], "the model's context is 512"),
        (["model.init_from=state/no-such-run/final_model"], "holds no model.pt"),
    ],
)
def test_config_errors_fail_before_any_worker_starts(dataset, overrides, message):
    result = subprocess.run(pretrain_cli(f"data.dataset={dataset}", *overrides), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Ray instance" not in result.stdout + result.stderr  # no cluster was started or joined


def test_unreachable_tracking_server_fails_fast(dataset):
    config = load_config(PretrainConfig, QUICKSTART, [f"data.dataset={dataset}", "tracking.uri=http://127.0.0.1:9",
                                                      "tracking.preflight_timeout_s=2"])
    started = time.monotonic()
    with pytest.raises(Exception, match=r"127\.0\.0\.1:9 is not reachable"):
        run(config)
    assert time.monotonic() - started < 60


def test_config_holds_no_credentials():
    with pytest.raises(ConfigError, match=r"storage\.0\.secret: unknown key"):
        load_config(PretrainConfig, None, ["storage=[{prefix: 's3://b', secret: 'hunter2'}]"])
