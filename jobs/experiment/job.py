"""The experiment job: run a plan's steps through the jobs' own APIs, skip what is finished, report.

Steps whose inputs are done start as soon as the cluster has room for them (each asks for the CPUs its
job holds), up to `max_concurrent_steps` at a time, each in a thread of this driver: the jobs block on
their Ray work, so threads cost nothing while Ray schedules the work itself. A step is finished when its
record is written, after its job returned; a re-run skips it. Every step's MLflow run hangs under the
experiment's parent run (pretraining runs as children, searches and evaluations tagged so).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from jobs import evaluate, pretrain, tokenize, tune
from jobs.common import storage, tracking
from jobs.common.config import config_to_dict
from jobs.common.ray_session import ensure_ray
from jobs.experiment.config import ExperimentConfig
from jobs.experiment.plan import Plan, Step, describe, make_plan
from jobs.experiment.report import write_report

PARENT_TAG = "mlflow.parentRunId"


@dataclass
class ExperimentResult:
    name: str
    root: str
    run_id: str | None
    tracking_uri: str | None
    ran: list[str]
    skipped: list[str]
    report: dict[str, Any] | None  # the report step's record
    wall_s: float
    plan_text: str


def finished(plan: Plan) -> dict[str, dict[str, Any]]:
    """Records of the steps that are done, by step name."""
    records = {}
    for step in plan:
        url = plan.record_url(step)
        if storage.exists(url):
            records[step.name] = json.loads(storage.read_bytes(url))
    return records


def run(config: ExperimentConfig, dry_run: bool = False) -> ExperimentResult:
    started = time.monotonic()
    plan = make_plan(config)
    if dry_run:
        try:
            records = finished(plan)
            note = ""
        except Exception as error:  # e.g. no credentials for the bucket yet: the plan is still worth seeing
            records, note = {}, f"\n  (what is done is unknown: {plan.root} could not be read: {type(error).__name__})"
        return ExperimentResult(config.name, plan.root, None, None, [], list(records), None, 0.0,
                                describe(plan, set(records)) + note)
    records = finished(plan)
    text = describe(plan, set(records))
    print(text, flush=True)
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.uri)
    tracking.preflight(tracking_uri, config.tracking.preflight_timeout_s)
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, config.tracking.experiment, config.tracking.artifact_root)
    run_id, _ = tracking.start_or_resume_run(
        client, experiment_id, f"experiment/{config.name}",
        tracking.params_from_config(config_to_dict(config)), {"experiment.root": plan.root})
    try:
        ran = []
        if len(records) < len(plan.steps):
            # A local cluster gets room for the largest steps that may run at once: sized for one, a
            # 1-worker pretraining run would hold it and leave the other cores idle.
            largest = sorted((step.cpus for step in plan), reverse=True)[:config.max_concurrent_steps]
            ensure_ray(local_num_cpus=math.ceil(sum(largest)))
            ran = _run_steps(plan, records, Context(plan, client, tracking_uri, run_id, records))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return ExperimentResult(config.name, plan.root, run_id, tracking_uri, ran,
                            [name for name in records if name not in ran], records.get("report"),
                            time.monotonic() - started, text)


@dataclass
class Context:
    plan: Plan
    client: MlflowClient
    tracking_uri: str
    run_id: str  # the experiment's parent run
    records: dict[str, dict[str, Any]]


def _run_steps(plan: Plan, records: dict[str, dict[str, Any]], context: Context) -> list[str]:
    import ray

    capacity = ray.cluster_resources().get("CPU", 1)
    pending = [step for step in plan if step.name not in records]
    ran: list[str] = []
    running: dict[Future, Step] = {}
    pool = ThreadPoolExecutor(max_workers=plan.config.max_concurrent_steps, thread_name_prefix="step")
    try:
        while pending or running:
            busy = sum(step.cpus for step in running.values())
            for step in list(pending):
                ready = all(need in records for need in step.needs)
                fits = not running or (len(running) < plan.config.max_concurrent_steps and busy + step.cpus <= capacity)
                if ready and fits:
                    pending.remove(step)
                    busy += step.cpus
                    print(f"== {step.name} ({step.key}): started", flush=True)
                    running[pool.submit(_run_step, step, context)] = step
            if not running:
                stuck = ", ".join(step.name for step in pending)
                raise RuntimeError(f"steps whose inputs never finished: {stuck}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                record = future.result()  # a failed step fails the experiment, after the others end
                records[step.name] = record
                storage.write_bytes(plan.record_url(step), json.dumps(record, indent=2).encode())
                ran.append(step.name)
                print(f"== {step.name}: done in {record['wall_s']:.0f} s{_headline(record)}", flush=True)
    except KeyboardInterrupt:
        # The pool's threads block inside jobs until their Ray work ends; leaving now stops that work
        # with this driver, and the finished steps' records make a re-run continue from here.
        print("interrupted: run the same command again to continue", file=sys.stderr, flush=True)
        os._exit(130)
    finally:
        pool.shutdown(wait=True)
    return ran


def _headline(record: dict[str, Any]) -> str:
    loss = record.get("metrics", {}).get("val_loss")
    return f" (val_loss {loss:.4f})" if isinstance(loss, float) else ""


def _run_step(step: Step, context: Context) -> dict[str, Any]:
    started = time.monotonic()
    record = RUNNERS[step.kind](step, context)
    return {"kind": step.kind, "name": step.name, "key": step.key, "output": step.output,
            "wall_s": time.monotonic() - started, **record}


def _generate(step: Step, context: Context) -> dict[str, Any]:
    files = []
    for recipe in step.facts["recipes"]:
        files.append(str(tokenize.write_genome(recipe, step.output)))
    return {"files": files}


def _tokenize(step: Step, context: Context) -> dict[str, Any]:
    manifest = tokenize.run(step.job_config)
    return {"dataset": step.output, "totals": config_to_dict(manifest.totals)}


def _pretrain(step: Step, context: Context) -> dict[str, Any]:
    result = pretrain.run(step.job_config, parent_run_id=context.run_id)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    return {"run_id": result.run_id, "model_path": result.model_path, "metrics": metrics, **step.facts}


def _tune(step: Step, context: Context) -> dict[str, Any]:
    result = tune.run(step.job_config)
    context.client.set_tag(result.parent_run_id, PARENT_TAG, context.run_id)
    rows = [{"params": row.params, "val_loss": row.val_loss, "run_id": row.run_id, "outcome": row.outcome}
            for row in result.rows]
    return {"run_id": result.parent_run_id, "trials": rows}


def _evaluate(step: Step, context: Context) -> dict[str, Any]:
    result = evaluate.run(step.job_config)
    context.client.set_tag(result.run_id, PARENT_TAG, context.run_id)
    return {"run_id": result.run_id, "results": result.results_url}


def _report(step: Step, context: Context) -> dict[str, Any]:
    return write_report(context.plan, context.records, step.output, context.client, context.run_id)


RUNNERS = {"generate": _generate, "tokenize": _tokenize, "pretrain": _pretrain, "tune": _tune,
           "evaluate": _evaluate, "report": _report}


def summary(result: ExperimentResult) -> str:
    if result.run_id is None:
        return result.plan_text
    lines = [f"experiment {result.name}: {len(result.ran)} steps run, {len(result.skipped)} already done, "
             f"{result.wall_s:.0f} s", f"  output:     {result.root}",
             f"  MLflow run: {result.run_id} ({result.tracking_uri})"]
    if result.report:
        lines.append(f"  report:     {result.report['report']}")
        lines.extend(f"  {line}" for line in result.report["verdicts"])
    return "\n".join(lines)
