"""The interpretability analyses of an evaluation, per model: residual write intensity around known features,
reverse-complement symmetry of the memory tables, and LogitLens-KL (the functions are in `interpret`).

They run on the driver, on a few sequences: each model is built once from the state dict the embedding
actors share, in eval mode with dropless routing. A model without Gengram gets LogitLens only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from jobs.common.fasta import InputError, Source, read_fasta
from jobs.common.genes import read_features
from jobs.common.storage import options_for
from jobs.evaluate import interpret
from jobs.evaluate.config import EvaluateConfig, InterpretabilitySection
from jobs.evaluate.embed import padded
from jobs.evaluate.models import ResolvedModel
from jobs.evaluate.outputs import slug
from jobs.evaluate.sources import TaskData
from model import GengramLM
from model.vocab import encode


@dataclass(frozen=True)
class Sequences:
    """What the analyses are drawn on: token rows, their names, and per row its annotation tracks."""

    names: list[str]
    tokens: list[np.ndarray]
    tracks: list[dict[str, list[tuple[int, int]]]]

    def batch(self, context: int) -> torch.Tensor:
        """The rows cut to `context` and padded on the right with PAD."""
        return padded([row[:context] for row in self.tokens])


def load_sequences(config: EvaluateConfig, tasks: list[TaskData]) -> Sequences:
    """The sequences config.interpretability.sequences names, with their tracks (checked before any Ray work)."""
    chosen = config.interpretability.sequences
    if chosen.task is not None:
        task = next(t for t in tasks if t.name == chosen.task)
        test = task.examples.filter(np.asarray(task.examples["split"].to_pylist()) == "test")
        # the positive class first: that is where the features the analyses look for are
        order = np.argsort(-test["label"].to_numpy(), kind="stable")[: chosen.max_sequences]
        ids = [test["id"][int(i)].as_py() for i in order]
        tokens = [encode(test["sequence"][int(i)].as_py()) for i in order]
        tracks = [{name: spans.get(i, []) for name, spans in task.tracks.items()} for i in ids]
        return Sequences(ids, tokens, tracks)
    source = Source(chosen.fasta, options_for(chosen.fasta, config.storage))
    features = []
    if chosen.annotation is not None:
        features = read_features(Source(chosen.annotation, options_for(chosen.annotation, config.storage)))
    if chosen.around is None:  # each record's first `length` bases
        windows = {}
    else:  # `length` bases centred on each of the first features of that type
        centred = [f for f in features if f.type == chosen.around][: chosen.max_sequences]
        if not centred:
            raise InputError(chosen.annotation, f"has no feature of type {chosen.around!r} "
                                                "(interpretability.sequences.around)")
        windows = {f: max(0, (f.start + f.end) // 2 - chosen.length // 2) for f in centred}
    needed = {}  # bases to hold per record: a chromosome-long record is read, not held, past them
    for feature, start in windows.items():
        needed[feature.contig] = max(needed.get(feature.contig, 0), start + chosen.length)
    records: dict[str, list[np.ndarray]] = {}
    held: dict[str, int] = {}
    for name, piece in read_fasta(source):
        if windows and name not in needed:
            continue
        if not windows and name not in records and len(records) == chosen.max_sequences:
            break
        if held.get(name, 0) < needed.get(name, chosen.length):
            records.setdefault(name, []).append(piece)
            held[name] = held.get(name, 0) + piece.size
    missing = sorted(needed.keys() - records.keys())
    if missing:
        raise InputError(chosen.fasta, f"has no record {missing[0]!r}, which {chosen.annotation} annotates")
    spans = [(f.contig, start) for f, start in windows.items()] or [(name, 0) for name in records]
    names, tokens, tracks = [], [], []
    for contig, start in spans:
        row = np.concatenate(records[contig])[start : start + chosen.length]
        by_type: dict[str, list[tuple[int, int]]] = {}
        for feature in features:
            if feature.contig == contig and feature.end > start and feature.start < start + len(row):
                by_type.setdefault(feature.type, []).append(
                    (max(feature.start - start, 0), min(feature.end - start, len(row))))
        names.append(f"{contig}:{start}-{start + len(row)}" if windows else contig)
        tokens.append(row)
        tracks.append(by_type)
    return Sequences(names, tokens, tracks)


@dataclass
class Findings:
    """What the analyses found, over all models: numbers for results.json and MLflow, and the plots."""

    logit_lens: dict[str, list[float]] = field(default_factory=dict)
    rc_symmetry: list[dict] = field(default_factory=list)
    codons: dict[str, dict[str, float]] = field(default_factory=dict)
    enrichment: list[dict] = field(default_factory=list)
    _drawings: list = field(default_factory=list)  # (file name, function drawing it to a path)

    def add(self, model: ResolvedModel, sequences: Sequences, section: InterpretabilitySection,
            weights: ray.ObjectRef | None) -> None:
        net = _build(model, weights)
        ids = sequences.batch(model.config.max_seq_len)
        analyses = set(section.analyses)
        if "logit_lens" in analyses:
            self.logit_lens[model.name] = interpret.logit_lens_kl(net, ids).tolist()
        gengrams = {layer.layer_id: layer.gengram for layer in net.layers if layer.gengram is not None}
        if "rc_symmetry" in analyses:
            for layer_id, gengram in gengrams.items():
                self.rc_symmetry += [{"model": model.name, **asdict(row)}
                                     for row in interpret.rc_symmetry(gengram, layer_id, section.seed)]
                if 3 in gengram.config.ngram_sizes:
                    self.codons[f"{model.name}/layer{layer_id}"] = interpret.codon_clusters(gengram, section.seed)
                    self._drawings.append((
                        f"codons_{model.name}_layer{layer_id}.png",
                        lambda path, g=gengram, t=f"{model.name}, layer {layer_id}: 3-mer memory rows":
                            interpret.plot_codon_projection(g, path, title=t)))
        if "write_intensity" in analyses and gengrams:
            traces = interpret.write_intensity(net, ids)
            for row, (name, tracks) in enumerate(zip(sequences.names, sequences.tracks, strict=True)):
                length = min(len(sequences.tokens[row]), ids.shape[1])
                for track, spans in tracks.items():
                    inside = interpret.span_mask(spans, length)
                    if not inside.any():
                        continue
                    for layer_id, trace in traces.items():
                        numbers = interpret.feature_enrichment(trace.intensity[row, :length], inside,
                                                               spacing=gengrams[layer_id].config.window_size or 1)
                        self.enrichment.append({"model": model.name, "sequence": name, "track": track,
                                                "layer_id": layer_id, **numbers})
                self._drawings.append((
                    f"writes_{model.name}_{slug(name)}.png",
                    lambda path, r=row, tr=tracks, t=f"{model.name}: Gengram writes along {name}":
                        interpret.plot_write_intensity(traces, tr, path, sequence=r, title=t)))

    def metrics(self) -> dict[str, float]:
        """The headline numbers, for the parent MLflow run."""
        metrics = {}
        for model, curve in self.logit_lens.items():
            metrics[f"interpret/{model}/logit_lens_kl_mean"] = float(np.mean(curve[:-1])) if len(curve) > 1 else 0.0
        for row in self.rc_symmetry:
            key = f"interpret/{row['model']}/layer{row['layer_id']}/rc_k{row['k']}"
            metrics[f"{key}_rank_biserial"] = row["rank_biserial"]
            metrics[f"{key}_p_value"] = row["p_value"]
        for name, scores in self.codons.items():
            for score, value in scores.items():
                metrics[f"interpret/{name}/codon_{score}"] = value
        for (model, track, layer_id), rows in _grouped(self.enrichment).items():
            key = f"interpret/{model}/layer{layer_id}/{slug(track)}"
            metrics[f"{key}_intensity_ratio"] = float(np.nanmean([r["ratio"] for r in rows]))
            metrics[f"{key}_top_peak_share"] = float(np.mean([r["top_peak_share"] for r in rows]))
        return metrics

    def summary(self) -> dict:
        return {"logit_lens_kl": self.logit_lens, "rc_symmetry": self.rc_symmetry, "codon_clusters": self.codons,
                "write_enrichment": self.enrichment}

    def plots(self, directory: Path) -> list[Path]:
        drawn = [draw(directory / name) for name, draw in self._drawings]
        if self.logit_lens:
            curves = {model: np.asarray(curve) for model, curve in self.logit_lens.items()}
            drawn.append(interpret.plot_logit_lens(curves, directory / "logit_lens_kl.png"))
        return drawn


def _build(model: ResolvedModel, weights: ray.ObjectRef | None) -> GengramLM:
    torch.manual_seed(model.seed)  # random_init: the same weights the embedding actors built
    net = GengramLM(model.config)
    if weights is not None:
        net.load_state_dict(ray.get(weights))
    return net.eval()


def _grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["track"], row["layer_id"]), []).append(row)
    return groups
