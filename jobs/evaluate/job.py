"""The evaluation job's driver: resolve models and load tasks (every check before any Ray work), embed
through Ray Data (reusing what a previous run wrote), fit probes and score variants on the driver, run the
interpretability analyses, then write Contract 4's outputs and the MLflow runs (a parent per evaluation, a
child per model).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from mlflow.tracking import MlflowClient

from jobs.common import storage, tracking
from jobs.common.config import ConfigError, config_to_dict
from jobs.common.ray_session import ensure_ray
from jobs.evaluate import analyses, outputs, report
from jobs.evaluate.config import EvaluateConfig
from jobs.evaluate.embed import EmbeddingRequest, layer_column, run_inference
from jobs.evaluate.kmer import kmer_spectrum
from jobs.evaluate.models import ResolvedModel, resolve
from jobs.evaluate.outputs import MetricRow
from jobs.evaluate.probes import binary_auroc, evaluate_probes, log_probe_plots
from jobs.evaluate.sources import TaskData, load_task
from model.exported import local, read_state_dict

ZERO_SHOT = "zero_shot"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class EvaluationResult:
    name: str
    output: str
    results_url: str
    run_id: str
    tracking_uri: str
    metrics: list[MetricRow]
    comparison: str  # the markdown table


def summary(result: EvaluationResult) -> str:
    return (f"evaluation {result.name}: {len(result.metrics)} figures in {result.results_url}; "
            f"MLflow run {result.run_id} ({result.tracking_uri})\n{result.comparison}")


def layers_of(config: EvaluateConfig, model: ResolvedModel) -> tuple[int, ...]:
    depth = model.config.num_layers
    chosen = config.embedding.layers
    if chosen == "last":
        return (depth,)
    if chosen == "all":
        return tuple(range(1, depth + 1))
    wrong = [layer for layer in chosen if not 1 <= layer <= depth]
    if wrong:
        raise ConfigError(f"embedding.layers: layer {wrong[0]} is not in 1..{depth} of model {model.name!r}")
    return tuple(chosen)


def check_fits(config: EvaluateConfig, models: list[ResolvedModel], tasks: list[TaskData]) -> None:
    """A classification sequence longer than a model's context is refused, with its id, unless embedding.long
    is `window`. (Variant windows are cropped to the context, centred on the variant.)"""
    for model in (m for m in models if m.is_transformer):
        layers_of(config, model)
        if config.embedding.long == "window":
            continue
        for task in (t for t in tasks if t.kind == "classification"):
            lengths = pa.compute.utf8_length(task.examples["sequence"]).to_numpy()
            longest = int(lengths.argmax())
            if lengths[longest] > model.config.max_seq_len:
                raise ConfigError(
                    f"tasks.{task.name}: sequence {task.examples['id'][longest]} has {lengths[longest]} bases, "
                    f"more than model {model.name!r} reads ({model.config.max_seq_len}); set embedding.long=window "
                    "to embed it in windows")


def crop_variants(examples: pa.Table, length: int) -> pa.Table:
    """Windows of at most `length` bases centred on each variant."""
    refs, alts, offsets = [], [], []
    for ref, alt, offset in zip(examples["ref_sequence"].to_pylist(), examples["alt_sequence"].to_pylist(),
                                examples["variant_offset"].to_pylist(), strict=True):
        start = min(max(0, offset - length // 2), max(0, len(ref) - length))
        refs.append(ref[start : start + length])
        alts.append(alt[start : start + length])
        offsets.append(offset - start)
    return (examples.set_column(examples.schema.get_field_index("ref_sequence"), "ref_sequence", pa.array(refs))
            .set_column(examples.schema.get_field_index("alt_sequence"), "alt_sequence", pa.array(alts))
            .set_column(examples.schema.get_field_index("variant_offset"), "variant_offset", pa.array(offsets)))


class Evaluation:
    """One evaluation's state on the driver: where things go and what has been measured."""

    def __init__(self, config: EvaluateConfig, tracking_uri: str):
        self.config = config
        self.output = storage.absolute(config.output_url)
        self.options = config.storage_options(config.output_url)
        self.client = MlflowClient(tracking_uri)
        self.rows: list[MetricRow] = []
        self.files: dict[str, str] = {}
        self.plots_dir = Path(tempfile.mkdtemp(prefix="gengram-evaluate-"))

    # ---- embeddings, reused when a previous run wrote them

    def settings(self, task: TaskData) -> dict:
        embedding = self.config.embedding
        settings = {"pooling": embedding.pooling, "reverse_complement": embedding.reverse_complement,
                    "long": embedding.long}
        if task.kind == "variant_effect":
            settings["zero_shot"] = self.config.zero_shot.model_dump()
        return settings

    def features(self, model: ResolvedModel, task: TaskData, weights, layers: tuple[int | None, ...]):
        """{split: {layer: (ids, labels, vectors)}} and, for variant tasks, the scores table."""
        key = outputs.task_key(task.content_hash, self.settings(task))
        splits = sorted(set(task.examples["split"].to_pylist()))
        urls = {(split, layer): outputs.embeddings_url(self.output, model.identity, task.name, key, split, layer)
                for split in splits for layer in layers}
        scores_url = outputs.scores_url(self.output, model.identity, task.name, key)
        wanted = list(urls.values()) + ([scores_url] if task.kind == "variant_effect" else [])
        if not all(storage.exists(url, self.options) for url in wanted):
            self.compute(model, task, weights, layers, urls, scores_url)
        self.files.update({f"embeddings/{model.name}/{task.name}/{s}/{l}": u for (s, l), u in urls.items()})
        features = {}
        for (split, layer), url in urls.items():
            table = outputs.read_table(url, self.options)
            features.setdefault(split, {})[layer] = (
                table["id"].to_numpy(zero_copy_only=False), table["label"].to_numpy(), outputs.vectors_of(table))
        scores = None
        if task.kind == "variant_effect":
            scores = outputs.read_table(scores_url, self.options)
            self.files[f"scores/{model.name}/{task.name}"] = scores_url
        return features, scores

    def compute(self, model, task, weights, layers, urls, scores_url) -> None:
        examples = task.examples
        if model.kind == "kmer":
            vectors = {None: kmer_spectrum(examples["sequence"].to_pylist())}
            columns = {"id": examples["id"].to_numpy(zero_copy_only=False), "label": examples["label"].to_numpy()}
        else:
            if task.kind == "variant_effect":
                limit = self.config.zero_shot.window or model.config.max_seq_len
                examples = crop_variants(examples, min(limit, model.config.max_seq_len))
            embedding, resources = self.config.embedding, self.config.resources
            request = EmbeddingRequest(layers=layers, pooling=embedding.pooling,
                                       reverse_complement=embedding.reverse_complement == "average",
                                       batch_size=embedding.batch_size,
                                       reduction=self.config.zero_shot.reduction)
            columns = run_inference(
                examples.drop_columns(["split"]), model.config, weights, model.seed, request,
                actors=resources.actors, cpus_per_actor=resources.cpus_per_actor,
                gpus_per_actor=resources.gpus_per_actor if resources.use_gpu else 0)
            vectors = {layer: columns[layer_column(layer)] for layer in layers}
        split = examples["split"].to_numpy(zero_copy_only=False)
        for (name, layer), url in urls.items():
            keep = split == name
            table = outputs.embeddings_table(columns["id"][keep], columns["label"][keep], vectors[layer][keep])
            outputs.write_table(url, table, self.options)
        if task.kind == "variant_effect" and "score" in columns:
            table = pa.table({name: columns[name] for name in ("id", "label", "ref_ll", "alt_ll", "score")})
            outputs.write_table(scores_url, table, self.options)

    # ---- measurements

    def probe(self, model: ResolvedModel, task: TaskData, features: dict, run_id: str, plot_layer) -> None:
        for layer in next(iter(features.values())):
            nothing = (None, None, None)
            _, y_train, x_train = features.get("train", {}).get(layer, nothing)
            _, y_val, x_val = features.get("validation", {}).get(layer, nothing)
            _, y_test, x_test = features.get("test", {}).get(layer, nothing)
            if x_train is None or x_test is None:
                continue  # a task without train/test (zero-shot only)
            if len(np.unique(y_train)) < 2:
                continue
            for result in evaluate_probes(self.config.probes, x_train, y_train, x_val, y_val, x_test, y_test):
                for metric, value in result.metrics.items():
                    self.rows.append(MetricRow(task.name, model.name, result.probe, layer, result.split, metric,
                                               value.value, value.ci_low, value.ci_high))
                if layer == plot_layer and result.split == "test":
                    log_probe_plots(run_id, f"{task.name}/{result.probe}", result.estimator, x_test, y_test,
                                    list(task.classes), tracking_uri=self.client.tracking_uri)

    def zero_shot(self, model: ResolvedModel, task: TaskData, scores: pa.Table | None) -> None:
        if scores is None:
            return
        labels = scores["label"].to_numpy(zero_copy_only=False)
        known = ~np.isnan(labels.astype(float))
        if known.sum() and len(np.unique(labels[known])) == 2:
            value = binary_auroc(labels[known].astype(int), scores["score"].to_numpy()[known],
                                 seed=self.config.probes.seed, bootstrap=self.config.probes.bootstrap)
            self.rows.append(MetricRow(task.name, model.name, ZERO_SHOT, None, "test", "auroc",
                                       value.value, value.ci_low, value.ci_high))

    def log_child(self, run_id: str, model: ResolvedModel) -> None:
        metrics = {}
        for row in (r for r in self.rows if r.model == model.name):
            layer = "" if row.layer is None or self.config.embedding.layers == "last" else f"/layer{row.layer}"
            split = "" if row.split == "test" else f"/{row.split}"
            metrics[f"{row.task}/{row.probe}{layer}{split}/{row.metric}"] = row.value
        tracking.log_metrics(self.client, run_id, metrics, step=0)


def run(config: EvaluateConfig) -> EvaluationResult:
    """Evaluate every model of `config` on every task, on the Ray cluster (joined or started)."""
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.uri)
    tracking.preflight(tracking_uri, config.tracking.preflight_timeout_s)
    models = resolve(config, tracking_uri)
    tasks = [load_task(t.name, t.kind, t.source, config.storage) for t in config.tasks]
    check_fits(config, models, tasks)
    sequences = analyses.load_sequences(config, tasks) if config.interpretability.analyses else None

    ensure_ray()
    evaluation = Evaluation(config, tracking_uri)
    client = evaluation.client
    experiment_id = tracking.get_or_create_experiment(client, config.tracking.experiment,
                                                      config.tracking.artifact_root)
    resolved_config = config_to_dict(config)
    parent_id, _ = tracking.start_or_resume_run(
        client, experiment_id, config.name, tracking.params_from_config(resolved_config),
        {"gengram.job": "evaluate", **tracking.ray_job_tags()})
    interpretation = analyses.Findings()
    try:
        for model in models:
            child_id, _ = tracking.start_or_resume_run(
                client, experiment_id, f"{config.name}/{model.name}", {}, model.tags(), parent_run_id=parent_id)
            layers = layers_of(config, model) if model.is_transformer else (None,)
            weights = ray.put(read_state_dict(local(model.directory))) if model.directory else None
            for task in tasks:
                print(f"evaluate: {model.name} on {task.name} ({task.examples.num_rows} examples)", flush=True)
                features, scores = evaluation.features(model, task, weights, layers)
                if task.kind == "classification" or config.zero_shot.embedding_probe:
                    evaluation.probe(model, task, features, child_id, plot_layer=layers[-1])
                evaluation.zero_shot(model, task, scores)
            if model.is_transformer and sequences is not None:
                interpretation.add(model, sequences, config.interpretability, weights)
            evaluation.log_child(child_id, model)
            client.set_terminated(child_id, "FINISHED")
        comparison = report.comparison_table(evaluation.rows, [m.name for m in models], tasks)
        artifacts = report.draw_all(evaluation.rows, interpretation, evaluation.plots_dir)
        artifacts += report.write_tables(comparison, evaluation.plots_dir)
        for path in artifacts:
            url = storage.join(evaluation.output, "plots" if path.suffix == ".png" else "", path.name)
            storage.write_bytes(url, path.read_bytes(), evaluation.options)
            evaluation.files[f"artifacts/{path.name}"] = url
            client.log_artifact(parent_id, str(path))
        tracking.log_metrics(client, parent_id, interpretation.metrics(), step=0)
        results_url = outputs.write_results(
            evaluation.output, resolved_config, evaluation.rows, evaluation.files,
            {"models": [{"name": m.name, "kind": m.kind, "identity": m.identity, "uri": m.uri} for m in models],
             "tasks": [{"name": t.name, "kind": t.kind, "classes": list(t.classes), "content_hash": t.content_hash,
                        "semi_synthetic": t.semi_synthetic} for t in tasks],
             "interpretability": interpretation.summary(),
             "mlflow": {"tracking_uri": tracking_uri, "run_id": parent_id}},
            evaluation.options)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    return EvaluationResult(config.name, evaluation.output, results_url, parent_id, tracking_uri,
                            evaluation.rows, comparison.markdown)

