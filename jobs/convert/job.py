"""The conversion driver: check the whole checkpoint against the model its args describe, map it tensor
by tensor, and publish the output only once it is complete (written to a temporary sibling and renamed;
on an object store the file that marks completeness, model_config.json or the iteration tracker, last).
With `register`, the published model is then logged to MLflow and registered, as pretraining's final model is.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from jobs.common import tracking
from jobs.common.config import config_to_dict
from jobs.common.errors import BadInput
from jobs.common.registry import log_gengram_model
from jobs.common.storage import exists, filesystem, is_local, join, local_directory, open_url
from jobs.convert import legacy, megatron, torch_dist
from jobs.convert.config import ConvertConfig
from model import exported
from model.config import ModelConfig, flavour


@dataclass(frozen=True)
class ConversionResult:
    direction: str
    source: str
    iteration: int  # Megatron's: the one read (import) or written (export)
    output: str
    model_config: ModelConfig
    tensors: int  # tensors written
    unused_gengram_layers: int  # layers whose Gengram parameters the fork built but never used (dropped / zeros)
    seconds: float
    peak_rss_mb: float  # of this process, over its whole life
    registered_uri: str | None = None  # models:/<name>/<version> with `register`
    mlflow_run_id: str | None = None


def summary(result: ConversionResult) -> str:
    config = result.model_config
    what, unused = ("imported into", "dropped") if result.direction == "import" else ("exported to", "zeros")
    return (f"{result.source} {what} {result.output}: {result.tensors} tensors, {config.num_layers} layers, "
            f"{config.num_experts} experts, Gengram at {list(config.gengram_layers)} "
            f"({result.unused_gengram_layers} unused Gengram layers {unused}), "
            f"{result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB"
            + (f"; registered as {result.registered_uri} (MLflow run {result.mlflow_run_id})"
               if result.registered_uri else ""))


def run(config: ConvertConfig) -> ConversionResult:
    output_options = config.storage_options(config.output)
    if exists(config.output, output_options) and not config.force:
        raise BadInput(f"output {config.output} exists; set force=true to replace it")
    tracking_uri = None
    if config.registered_name:  # before any work: an unreachable server must not cost a 10B conversion
        tracking_uri = tracking.resolve_tracking_uri(config.tracking.uri)
        tracking.preflight(tracking_uri, config.tracking.preflight_timeout_s)
    started = time.perf_counter()
    if config.direction == "import":
        source, iteration, model_config, written = import_checkpoint(config)
    else:
        source, iteration, model_config, written = export_model(config)
    unused = model_config.num_layers - len(model_config.gengram_layers) if model_config.has_gengram else 0
    result = ConversionResult(config.direction, source, iteration, config.output, model_config, written, unused,
                              time.perf_counter() - started,
                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if tracking_uri:
        result = register(config, tracking_uri, result)
    return result


def register(config: ConvertConfig, tracking_uri: str, result: ConversionResult) -> ConversionResult:
    """Log the published model into a new MLflow run that records where it came from, and register it."""
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, config.tracking.experiment,
                                                      config.tracking.artifact_root)
    tags = {"gengram.job": "convert", "gengram.source_checkpoint": result.source,
            "gengram.iteration": str(result.iteration), **tracking.ray_job_tags()}
    run_id = client.create_run(experiment_id, run_name=f"convert-{config.registered_name}", tags=tags).info.run_id
    params = tracking.params_from_config({**config_to_dict(config), "model_resolved": result.model_config.to_dict(),
                                          "result": {"source": result.source, "iteration": result.iteration,
                                                     "tensors": result.tensors,
                                                     "unused_gengram_layers": result.unused_gengram_layers}})
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, {"seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb}, step=0)
    try:
        with local_directory(config.output, config.storage_options(config.output)) as model_dir:
            registered_uri = log_gengram_model(tracking_uri, run_id, model_dir, config.registered_name)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return dataclasses.replace(result, registered_uri=registered_uri, mlflow_run_id=run_id)


def import_checkpoint(config: ConvertConfig) -> tuple[str, int, ModelConfig, int]:
    source, options = config.checkpoint, config.storage_options(config.checkpoint)
    iteration = legacy.latest_iteration(source, options) if config.iteration is None else config.iteration
    layout = torch_dist.TorchDistCheckpoint if torch_dist.is_torch_dist(source, iteration, options) \
        else legacy.LegacyCheckpoint
    with layout(source, iteration, options) as checkpoint:
        model_config = checked_config(config, checkpoint.args)
        spelling = megatron.detect_spelling(checkpoint.shapes)
        # Without args (a torch_dist checkpoint saved without them), the embedding says how Megatron padded.
        padded_vocab = checkpoint.args.get("padded_vocab_size") or checkpoint.shapes.get(megatron.EMBEDDING, (0,))[0]
        megatron.check_names(checkpoint.shapes, megatron.megatron_shapes(model_config, spelling, padded_vocab), source)
        state = megatron.import_state(checkpoint.read, model_config, spelling)
    publish(config, lambda directory: exported.write(directory, state, model_config), last=exported.CONFIG)
    return source, iteration, model_config, len(state)


def checked_config(config: ConvertConfig, args: dict) -> ModelConfig:
    """The model the checkpoint's args describe, which must be the named flavour's; or, for a checkpoint
    saved without args, the named flavour."""
    if not args:
        if config.flavour is None:
            raise megatron.ConversionError(f"{config.checkpoint} holds no Megatron args: name its flavour=<name>")
        return flavour(config.flavour)
    model_config = megatron.config_from_args(args)
    if config.flavour is not None:
        differences = megatron.mismatches(model_config, flavour(config.flavour))
        if differences:
            raise megatron.ConversionError(f"{config.checkpoint} is not flavour {config.flavour}: "
                                           + "; ".join(differences))
    return model_config


def export_model(config: ConvertConfig) -> tuple[str, int, ModelConfig, int]:
    def open_file(name: str, mode: str):
        return open_url(join(config.model, name), mode, config.storage_options(config.model))

    model_config = exported.read_config(open_file)
    section = config.export
    spelling = megatron.Spelling(fused_norms=section.layer_spec == "transformer_engine",
                                 grouped_experts=section.grouped_experts)
    state = megatron.export_state(exported.read_state_dict(open_file), model_config, spelling,
                                  dtype=section.torch_dtype)
    tensors = len(state)
    state |= dict.fromkeys(megatron.extra_state_names(model_config, spelling))
    args = megatron.args_for(model_config, section.pipeline_stages, dtype=section.torch_dtype)
    publish(config, lambda directory: legacy.write(directory, state, args, section.iteration,
                                                   section.pipeline_stages), last=legacy.TRACKER)
    return config.model, section.iteration, model_config, tensors


def publish(config: ConvertConfig, write: Callable[[Path], None], last: str) -> None:
    """Write the output into a temporary directory and put it in place whole: renamed over the output
    locally; uploaded with `last` (the file whose presence says the rest is complete) last elsewhere."""
    options = config.storage_options(config.output)
    fs, path = filesystem(config.output, options)
    if is_local(fs):
        staging = Path(f"{path.rstrip('/')}.{uuid.uuid4().hex}.tmp")
        try:
            write(staging)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as staging:
        write(Path(staging))
        files = sorted(Path(staging).rglob("*"), key=lambda file: file.name == last)
        if config.force and fs.exists(path):
            fs.rm(path, recursive=True)
        for file in (file for file in files if file.is_file()):
            fs.put_file(str(file), join(path, file.relative_to(staging).as_posix()))
