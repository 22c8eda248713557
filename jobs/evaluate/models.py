"""From a config's `models` entries to models the embedding actors can build: each resolved on the driver,
before any Ray work, to a local copy of its exported files and an identity that keys its embeddings.

Identities (Contract 4): `registered-<name>-v<version>` for models:/ URIs (an alias is resolved to its
version, so moving the alias re-evaluates), `run-<run id>-<artifact path>` for runs:/ URIs, `export-<sha256
of model_config.json and model.pt, 16 hex>` for an exported directory, `kmer-k1-6` for the k-mer spectrum
and `random_init-s<seed>-<identity of the model it copies>` for the untrained floor.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs.common import storage
from jobs.common.errors import BadInput
from jobs.evaluate.config import EvaluateConfig, ModelEntry
from jobs.evaluate.kmer import KMER_SIZES
from jobs.evaluate.outputs import slug
from model import ModelConfig, exported
from model.vocab import VOCAB_SIZE

_HASH_CHUNK = 16 << 20


class ModelUnavailable(BadInput):
    """A model URI that does not resolve, or a model this platform cannot read; names the entry."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    kind: str  # trained | kmer | random_init
    identity: str
    uri: str | None = None
    config: ModelConfig | None = None  # None for the k-mer spectrum
    directory: Path | None = None  # the exported files (model.pt, model_config.json); None: built, not loaded
    seed: int = 0
    source_run_id: str | None = None  # the pretraining run behind a registered or logged model

    @property
    def is_transformer(self) -> bool:
        return self.config is not None

    def tags(self) -> dict[str, str]:
        tags = {"gengram.model_identity": self.identity, "gengram.model_kind": self.kind}
        if self.uri:
            tags["gengram.model_uri"] = self.uri
        if self.source_run_id:
            tags["gengram.source_run_id"] = self.source_run_id
        return tags


def resolve(config: EvaluateConfig, tracking_uri: str) -> list[ResolvedModel]:
    """Every model of the config, in order; random_init entries after the model they copy."""
    trained = {e.name: _resolve_trained(e, config, tracking_uri) for e in config.models if e.kind == "trained"}
    resolved = []
    for entry in config.models:
        if entry.kind == "trained":
            resolved.append(trained[entry.name])
        elif entry.kind == "kmer":
            resolved.append(ResolvedModel(entry.name, "kmer", f"kmer-k{KMER_SIZES[0]}-{KMER_SIZES[-1]}"))
        else:
            like = trained[entry.like]
            resolved.append(ResolvedModel(entry.name, "random_init", f"random_init-s{entry.seed}-{like.identity}",
                                          config=like.config, seed=entry.seed))
    return resolved


def _resolve_trained(entry: ModelEntry, config: EvaluateConfig, tracking_uri: str) -> ResolvedModel:
    where = f"models.{entry.name}.uri={entry.uri}"
    cache = Path(storage.absolute(config.model_cache))
    if entry.uri.startswith(("models:/", "runs:/")):
        identity, source_run, location = _mlflow_identity(entry.uri, tracking_uri, where)
        directory = _download_mlflow(location, tracking_uri, identity, cache, where)
    else:
        directory = _fetch_export(entry.uri, config, cache, where)
        identity, source_run = "export-" + _content_hash(directory), None
    model_dir = directory / "artifacts" if (directory / "artifacts" / exported.WEIGHTS).exists() else directory
    if not (model_dir / exported.WEIGHTS).exists() or not (model_dir / exported.CONFIG).exists():
        raise ModelUnavailable(f"{where}: holds no {exported.WEIGHTS} + {exported.CONFIG} (an exported GengramLM)")
    try:
        model_config = exported.read_config(exported.local(model_dir))
    except (ValueError, TypeError, KeyError) as error:
        raise ModelUnavailable(f"{where}: its {exported.CONFIG} is not a GengramLM config ({error})") from None
    if model_config.vocab_size != VOCAB_SIZE:
        raise ModelUnavailable(f"{where}: vocabulary of {model_config.vocab_size} tokens; this platform's has "
                               f"{VOCAB_SIZE} (Contract 1)")
    return ResolvedModel(entry.name, "trained", identity, uri=entry.uri, config=model_config, directory=model_dir,
                         source_run_id=source_run)


def _mlflow_identity(uri: str, tracking_uri: str, where: str) -> tuple[str, str | None, str]:
    """(identity, the run that logged it, where its files are). The location of a registered version comes
    from this tracking store's registry: a models:/ URI handed to MLflow as is would be looked up in the
    process's default registry instead."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri.removeprefix("runs:/").partition("/")
            run = client.get_run(run_id)
            name = path or "model"
            # MLflow 3 keeps a model logged in a run as a LoggedModel beside the run's own artifacts
            logged = [m for m in client.search_logged_models([run.info.experiment_id], f"name = '{name}'")
                      if m.source_run_id == run_id]
            location = logged[0].artifact_location if logged else f"{run.info.artifact_uri}/{name}"
            return f"run-{run_id}-{slug(name)}", run_id, location
        name_and_version = uri.removeprefix("models:/")
        if "@" in name_and_version:
            name, alias = name_and_version.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name_and_version.rpartition("/")
            if number == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise MlflowException(f"registered model {name!r} has no version")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, number)
        location = client.get_model_version_download_uri(version.name, version.version)
    except MlflowException as error:
        raise ModelUnavailable(f"{where}: does not resolve ({_first_line(error)})") from None
    return f"registered-{slug(version.name)}-v{version.version}", version.run_id, location


def _download_mlflow(uri: str, tracking_uri: str, identity: str, cache: Path, where: str) -> Path:
    """A local copy of the model's files; kept per tracking store, whose names and versions are its own."""
    target = cache / hashlib.sha256(tracking_uri.encode()).hexdigest()[:8] / identity
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            # a runs:/ URI of a logged model lands in a folder named after it: the returned path says where
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch),
                                                       tracking_uri=tracking_uri)
            (scratch / ".root").write_text(str(Path(local).relative_to(scratch)))
            scratch.rename(target)  # whole or not at all: a half-downloaded model is never reused
        except (MlflowException, OSError) as error:
            raise ModelUnavailable(f"{where}: could not download ({_first_line(error)})") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target / (target / ".root").read_text()


def _fetch_export(url: str, config: EvaluateConfig, cache: Path, where: str) -> Path:
    options = config.storage_options(url)
    fs, path = storage.filesystem(storage.absolute(url), options)
    if storage.is_local(fs):
        if not fs.isdir(path):
            raise ModelUnavailable(f"{where}: no such directory")
        return Path(path)
    if not fs.exists(storage.join(path, exported.WEIGHTS)):
        raise ModelUnavailable(f"{where}: no {exported.WEIGHTS} there")
    # a remote export is copied once per content; its name is the hash of what it holds
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        for name in (exported.CONFIG, exported.WEIGHTS):
            fs.get(storage.join(path, name), str(Path(scratch) / name))
        target = cache / ("export-" + _content_hash(Path(scratch)))
        if not target.exists():
            shutil.copytree(scratch, target)
    return target


def _content_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (exported.CONFIG, exported.WEIGHTS):
        path = directory / name
        if not path.exists():
            raise ModelUnavailable(f"{directory}: holds no {name} (an exported GengramLM)")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
