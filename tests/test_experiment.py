"""jobs.experiment: the plan (keys, dry run, bad configs) without Ray, and a miniature of the laptop experiment
on generated genomes (every genome here is generated) that runs every step, is killed mid-pretraining and
resumed, reports a verdict per claim with the negative control holding, and is a no-op when run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, registered_checkpoints
from mlflow.tracking import MlflowClient

from jobs.common.config import ConfigError, build_config, load_config
from jobs.experiment import ExperimentConfig, make_plan

MINIATURE = {
    "name": "miniature",
    "genomes": {
        "structured": {"genomes": [{"name": "generated-mini-a", "contigs": [60000], "seed": 1}]},
        "iid": {"structure": "iid", "genomes": [{"name": "generated-mini-iid", "contigs": [30000], "seed": 2}]},
    },
    "datasets": {
        name: {"genomes": name,
               "tokenize": {"seq_len": 256, "val_fraction": 0.1, "shard_mib": 0.02, "gene_flank": None}}
        for name in ("structured", "iid")
    },
    "pretrain": {
        "overrides": {"train.max_steps": 6, "train.eval_every": 3, "train.eval_batches": 2, "train.log_every": 3,
                      "checkpoint.every": 2, "resources.num_workers": 1, "model.overrides.ep_size": 1,
                      "tracking.system_metrics": False},
        "variants": {"gengram": {"model.flavour": "debug"}, "baseline": {"model.flavour": "baseline-debug"}},
        "datasets": ["structured", "iid"],
        "seeds": [0],
    },
    "windows": {"dataset": "structured", "values": ["none", 21]},
    "evaluate": {"dataset": "structured", "config": {
        "tasks": [{"name": "ctcf", "source": {"type": "jaspar", "motif": "MA0139", "sites": 4, "length": 160,
                                              "per_class": 60, "seed": 0, "background": {"fasta": "genomes:iid"}}}],
        "probes": {"kinds": ["logistic"], "bootstrap": 50},
        "interpretability": {"analyses": ["write_intensity"], "sequences": {
            "fasta": "genomes:structured", "annotation": "genomes:structured:gff3", "around": "CRM",
            "max_sequences": 1, "length": 256}}}},
    "negative_control": {"dataset": "iid"},
}


def miniature(tmp_path: Path, tracking_uri: str = "sqlite:///unused.db", **changes) -> dict:
    config = json.loads(json.dumps(MINIATURE))
    config.update(output=str(tmp_path / "experiment"),
                  tracking={"uri": tracking_uri, "artifact_root": str(tmp_path / "artifacts"),
                            "experiment": "test-experiment"}, **changes)
    return config


def test_a_step_key_changes_with_what_it_is_made_of_and_nothing_else(tmp_path):
    before = {s.name: s.key for s in make_plan(build_config(ExperimentConfig, miniature(tmp_path)))}
    changed = miniature(tmp_path)
    changed["pretrain"]["variants"]["baseline"]["train.lr"] = 5e-4
    after = {s.name: s.key for s in make_plan(build_config(ExperimentConfig, changed))}
    moved = {name for name in before if before[name] != after[name]}
    assert moved == {"pretrain/structured/baseline/s0", "pretrain/iid/baseline/s0", "evaluate/structured", "report"}
    # The output root is not part of any key: a moved experiment keeps its addresses.
    elsewhere = {s.name: s.key for s in make_plan(build_config(ExperimentConfig, miniature(tmp_path / "other")))}
    assert elsewhere == before


def test_the_dry_run_prints_the_plan_without_starting_ray(tmp_path):
    # In a process of its own: this one may hold the suite's Ray session.
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(miniature(tmp_path), sort_keys=False))
    probe = ("import sys, ray; from jobs.experiment.__main__ import main; code = main(sys.argv[1:]); "
             "print('ray initialized:', ray.is_initialized()); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "--config", str(config_path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ray initialized: False" in done.stdout and not (tmp_path / "experiment").exists()
    lines = done.stdout.splitlines()[:-1]
    assert len([line for line in lines if line.strip().startswith("to run")]) == 11
    assert "pretrain/iid/gengram/s0" in done.stdout and "training tokens still to train" in lines[-1]


@pytest.mark.parametrize("config", ["experiment-laptop.yaml", "experiment-paper-ablation.yaml"])
def test_shipped_experiments_plan(config):
    plan = make_plan(load_config(ExperimentConfig, str(ROOT / "jobs" / "configs" / config)))
    kinds = {step.kind for step in plan}
    assert kinds == {"generate", "tokenize", "pretrain", "tune", "evaluate", "report"}
    windows = next(step for step in plan if step.kind == "tune").job_config.space.window_size
    assert {"none", 6, 12, 21, 30, 42} <= {w if w == "none" else int(w) for w in windows}


@pytest.mark.parametrize(("change", "message"), [
    ({"pretrain": {**MINIATURE["pretrain"], "datasets": ["structured", "nowhere"]}}, "'nowhere' not defined"),
    ({"windows": {"dataset": "structured", "variant": "other", "values": [6, 21]}}, "'other' is not one of"),
    ({"datasets": {"structured": {"genomes": "missing"}}}, "no genome set 'missing'"),
])
def test_a_bad_experiment_config_names_its_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        build_config(ExperimentConfig, miniature(tmp_path, **change))


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
def test_the_miniature_experiment_runs_resumes_reports_and_is_then_a_no_op(tmp_path, mlflow_server):
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(miniature(tmp_path, mlflow_server.tracking_uri), sort_keys=False))
    command = [sys.executable, "-m", "jobs.experiment", "--config", str(config_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    runs = tmp_path / "experiment" / "runs"

    # Killed once the first pretraining run has a checkpoint Ray Train registered (a checkpoint folder alone
    # may be one still being written, which a restart rightly ignores) and before that run finished.
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not any(
        registered_checkpoints(snapshot.read_text())
        for snapshot in runs.glob("structured-gengram-s0-*/*/checkpoint_manager_snapshot.json")
    ):
        assert first.poll() is None, "the experiment ended before it was killed"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    records = tmp_path / "experiment" / "steps"
    finished = {json.loads(p.read_text())["name"] for p in records.glob("*.json")}
    assert "pretrain/structured/gengram/s0" not in finished, finished

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    steps = {record["name"]: record for record in (json.loads(p.read_text()) for p in records.glob("*.json"))}
    client = MlflowClient(mlflow_server.tracking_uri)
    killed = steps["pretrain/structured/gengram/s0"]
    resumed = client.get_metric_history(killed["run_id"], "resumed_from_step")
    assert resumed and resumed[-1].value >= 2, "the killed run started over instead of resuming"
    report_path = next((tmp_path / "experiment" / "report").glob("*/report.md"))
    report = report_path.read_text()
    # Gengram's writes around the planted module the interpretability window is centred on, drawn in the report.
    writes = list(report_path.parent.glob("writes_gengram_chr*.png"))
    assert len(writes) == 1 and f"]({writes[0].name})" in report
    for claim in ("Gengram lowers the val loss", "speeds convergence", "steadies MoE load balance",
                  "interior optimum", "probe AUROC", "[negative control] holds"):
        assert claim in report, claim
    assert "PLATFORM FAILURE" not in report

    # The resumed run ends where an uninterrupted one does: the window sweep's 21 bp trial is the same run
    # (variant, seed, data, budget) trained without interruption.
    trial = next(t for t in steps["tune/structured/windows"]["trials"] if str(t["params"]["window_size"]) == "21")
    assert killed["metrics"]["val_loss"] == pytest.approx(trial["val_loss"], abs=1e-5)

    experiment = client.get_experiment_by_name("test-experiment")
    count = len(client.search_runs([experiment.experiment_id], max_results=1000))
    third = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "0 steps run, 11 already done" in third.stdout
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == count
