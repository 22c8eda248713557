"""The pretraining job's driver: check the config and the dataset, open the MLflow run, start a
Ray Train TorchTrainer whose workers run `jobs.pretrain.worker`, then export and register the
final model. Nothing here touches a GPU or a model's weights; the workers do.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray
import ray.data
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from jobs.common import plots, tracking
from jobs.common.config import ConfigError, config_hash, config_to_dict, config_to_yaml
from jobs.common.dataset import check_compatible, load_manifest, read_eval_rows, split_paths
from jobs.common.ray_session import ensure_ray, is_verbose
from jobs.common.registry import log_gengram_model
from jobs.common.storage import absolute, exists, join, local_directory, pyarrow_filesystem
from jobs.pretrain.config import PretrainConfig, deepspeed_config, validate
from jobs.pretrain.metrics import unigram_entropy
from jobs.pretrain.worker import FINAL_MODEL_DIR, rank_slice, train_worker
from model import ModelConfig, parameter_counts


@dataclass(frozen=True)
class PretrainResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: str
    model_path: str  # the final model on the run's storage (local path or bucket key)
    metrics: dict


def check_dataset(config: PretrainConfig, model_config: ModelConfig):
    """Read the manifest before any worker starts and refuse a dataset the model cannot read."""
    # absolute(): where run() reads the shards from, also under `ray job submit --working-dir`
    manifest = load_manifest(absolute(config.data.dataset), config.storage_options(config.data.dataset))
    check_compatible(manifest, vocab_size=model_config.vocab_size, max_seq_len=model_config.max_seq_len,
                     source=f"data.dataset={config.data.dataset}")
    return manifest


def train_storage(config: PretrainConfig):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    return pyarrow_filesystem(absolute(config.checkpoint.storage), config.storage_options(config.checkpoint.storage))


def check_init_from(config: PretrainConfig) -> None:
    """Workers resolve nothing: hand them an absolute `model.init_from`, checked here before they start."""
    if not config.model.init_from:
        return
    config.model.init_from = absolute(config.model.init_from)
    weights = join(config.model.init_from, "model.pt")
    if not exists(weights, config.storage_options(weights)):
        raise ConfigError(f"model.init_from={config.model.init_from} holds no model.pt (an exported final_model)")


def final_model_url(config: PretrainConfig) -> str:
    """Where a run's exported model lands: beside its checkpoints, where `model.init_from` finds it."""
    return join(absolute(config.checkpoint.storage), config.run_name, FINAL_MODEL_DIR)


def required_cpus(config: PretrainConfig) -> int:
    """Logical CPUs a run holds: its workers', plus one for Ray Data's streaming reads of the
    shards (training workers keep theirs for the whole run, so reads need a CPU beyond them)."""
    return math.ceil(config.resources.num_workers * config.resources.cpus_per_worker) + 1


def warn_if_cluster_too_small(config: PretrainConfig) -> None:
    available = ray.cluster_resources().get("CPU", 0)
    if available < required_cpus(config):
        print(f"warning: the cluster has {available:g} CPUs and this run needs {required_cpus(config)} "
              "(workers + 1 for data reads); it waits until the autoscaler adds nodes", file=sys.stderr)


def run(config: PretrainConfig, parent_run_id: str | None = None, train_callbacks: Sequence = ()) -> PretrainResult:
    """Train `config` on the Ray cluster (joined or started) and track it in MLflow.

    parent_run_id nests the MLflow run under another (a Tune search); train_callbacks are
    Ray Train callbacks, e.g. Tune's report callback when the run is a Tune trial."""
    model_config = validate(config)
    if model_config.drops_tokens:
        print(f"warning: model.overrides.drop_tokens=true: tokens beyond expert capacity (factor "
              f"{model_config.capacity_factor}) are dropped in training, which lets a position's output depend on "
              "later tokens; evaluation and the export stay dropless; moe/layer<l>/dropped_fraction is logged",
              file=sys.stderr, flush=True)
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.uri)
    tracking.preflight(tracking_uri, config.tracking.preflight_timeout_s)
    manifest = check_dataset(config, model_config)
    check_init_from(config)

    resolved = config_to_dict(config)
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, config.tracking.experiment, config.tracking.artifact_root)
    counts = parameter_counts(model_config)
    params = tracking.params_from_config({**resolved, "model_resolved": model_config.to_dict(),
                                          "params": counts})
    tags = {"dataset.manifest_hash": manifest.config_hash, "dataset.url": config.data.dataset,
            "config_hash": config_hash(resolved), **tracking.ray_job_tags()}
    commit = tracking.git_commit()
    if commit:
        tags["git.commit"] = commit
    run_id, resumed = tracking.start_or_resume_run(client, experiment_id, config.run_name, params, tags,
                                                   parent_run_id=parent_run_id)
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {tracking_uri}", flush=True)

    try:
        ensure_ray(local_num_cpus=required_cpus(config))
        warn_if_cluster_too_small(config)
        # The train stream is endless (epochs until max_steps): a progress bar for it would
        # only flood the logs; training progress is logged per step by rank 0 and to MLflow.
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Each epoch's order then follows from its seed alone, which an exact resume relies on (TrainStream).
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset, dataset_options = absolute(config.data.dataset), config.storage_options(config.data.dataset)
        train_paths, data_fs = split_paths(manifest, "train", dataset, dataset_options)
        train = ray.data.read_parquet(train_paths, columns=["tokens"], filesystem=data_fs)
        eval_rows = read_eval_rows(manifest, dataset, dataset_options,
                                   limit=config.train.eval_batches * config.train.micro_batch_size
                                   * config.resources.num_workers)
        world = config.resources.num_workers
        scored = np.concatenate([rank_slice(eval_rows, rank, world, config.train.eval_batches
                                            * config.train.micro_batch_size) for rank in range(world)])
        floor = unigram_entropy(scored, model_config.ignored_targets)
        client.log_metric(run_id, "val_unigram_entropy", floor, step=0)
        storage_path, storage_fs = train_storage(config)
        use_gpu = config.resources.use_gpu
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "config": resolved,
                "model_config": model_config.to_dict(),
                "eval_rows": eval_rows,
                "mlflow_run_id": run_id,
                "tracking_uri": tracking_uri,
                "system_metrics": config.tracking.system_metrics,
                "verbose": is_verbose(),
            },
            scaling_config=ScalingConfig(
                num_workers=config.resources.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": config.resources.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=config.run_name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
                failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
                callbacks=list(train_callbacks),
            ),
            datasets={"train": train},
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        model_path = finalize(client, run_id, config, model_config, result)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return PretrainResult(run_id, tracking_uri, result.checkpoint.path, model_path,
                          {**(result.metrics or {}), "val_unigram_entropy": floor})


def copy_directory(source: str, source_fs, destination: str, destination_fs) -> None:
    destination_fs.create_dir(destination, recursive=True)
    pyarrow.fs.copy_files(source, destination, source_filesystem=source_fs, destination_filesystem=destination_fs)


def finalize(client, run_id: str, config: PretrainConfig, model_config: ModelConfig, result) -> str:
    """Copy the final model out of the last checkpoint (only that folder, not the optimizer
    shards) and log config, plots and the model to MLflow."""
    checkpoint, fs = result.checkpoint, result.checkpoint.filesystem
    # Next to the run's checkpoints, on the same storage, where `model.init_from` finds it.
    final_url = final_model_url(config)
    final_options = config.storage_options(final_url)
    final_path, _ = pyarrow_filesystem(final_url, final_options)  # as the checkpoint's filesystem names it
    copy_directory(f"{checkpoint.path}/{FINAL_MODEL_DIR}", fs, final_path, fs)

    with local_directory(final_url, final_options) as model_dir, \
            tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "config.yaml").write_text(config_to_yaml(tracking.redact(config_to_dict(config))))
        (scratch / "deepspeed_config.json").write_text(json.dumps(deepspeed_config(config), indent=2))
        client.log_artifact(run_id, str(scratch / "config.yaml"))
        client.log_artifact(run_id, str(scratch / "deepspeed_config.json"))
        figures = [
            plots.plot_curves(client, run_id, ["loss", "lm_loss", "val_loss"], "loss", scratch / "loss_curves.png"),
            plots.plot_curves(client, run_id, ["aux_loss", "z_loss"], "MoE auxiliary losses",
                              scratch / "moe_losses.png"),
            plots.plot_expert_load(client, run_id, [i for i in range(1, model_config.num_layers + 1)
                                                    if model_config.is_moe_layer(i)],
                                   model_config.num_experts, scratch / "expert_load.png"),
        ]
        for plot in figures:
            if plot is not None:
                client.log_artifact(run_id, str(plot), artifact_path="plots")
        client.log_artifacts(run_id, str(model_dir), artifact_path=FINAL_MODEL_DIR)
        log_gengram_model(client.tracking_uri, run_id, model_dir, config.tracking.registered_model)
    client.set_tag(run_id, "checkpoint.path", checkpoint.path)
    client.set_tag(run_id, "final_model.path", final_path)
    return final_path


def summary(result: PretrainResult) -> str:
    metrics = result.metrics
    lines = [
        "",
        "Pretraining finished.",
        f"  MLflow run:     {result.run_id}",
        f"  tracking URI:   {result.tracking_uri}",
        f"  MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1",
        f"  checkpoint:     {result.checkpoint_path}",
        f"  final model:    {result.model_path}",
    ]
    for key in ("step", "loss", "val_loss"):
        if key in metrics:
            value = metrics[key]
            lines.append(f"  {key + ':':<15} {value:.4f}" if isinstance(value, float) else f"  {key + ':':<15} {value}")
    if "val_loss" in metrics:
        floor = metrics["val_unigram_entropy"]
        margin = floor - metrics["val_loss"]
        lines.append(f"  {'base freqs:':<15} {floor:.4f}  (the val loss of a model that knows only the val rows' "
                     f"base frequencies; val_loss is {abs(margin):.4f} {'below' if margin >= 0 else 'above'} it)")
    return "\n".join(lines)
