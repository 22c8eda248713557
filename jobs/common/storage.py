"""Object storage for every job: any fsspec URL (local path, file://, s3://, gs://, https://).

Functions here take plain fsspec options (`endpoint_url`, `anon`, `client_kwargs`, ...).
Configs that must never carry a secret describe options with `StorageRule` instead: a typed
model with no field for a key or token, so a resolved config (which manifests and MLflow
record) cannot hold a credential. Credentials come from the environment (AWS_* variables,
instance roles, gcloud credentials), read by the underlying libraries themselves.

Writes are atomic per file: a reader sees a whole file or none, which is what lets a job
publish a dataset by writing its manifest last.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import model_validator

from jobs.common.config import StrictModel

OBJECT_STORES = ("s3", "s3a", "gs", "gcs")


class StorageRule(StrictModel):
    """fsspec options for every URL that starts with `prefix`; the longest matching prefix wins."""

    prefix: str
    endpoint_url: str | None = None
    anon: bool | None = None
    region: str | None = None

    @model_validator(mode="after")
    def _object_store_only(self) -> StorageRule:
        if protocol(self.prefix) not in OBJECT_STORES:
            raise ValueError(f"storage options apply to s3:// and gs:// prefixes, not {self.prefix!r}")
        return self

    def fsspec_options(self) -> dict[str, Any]:
        if protocol(self.prefix) in ("gs", "gcs"):
            options: dict[str, Any] = {"token": "anon"} if self.anon else {}
            if self.endpoint_url:
                options["endpoint_url"] = self.endpoint_url
            return options
        client = {"endpoint_url": self.endpoint_url, "region_name": self.region}
        options = {"client_kwargs": {key: value for key, value in client.items() if value is not None}}
        if self.anon is not None:
            options["anon"] = self.anon
        return options


def protocol(url: str) -> str:
    return split_protocol(url)[0] or "file"


def options_for(url: str, rules: Sequence[StorageRule]) -> dict[str, Any]:
    matches = [rule for rule in rules if url.startswith(rule.prefix)]
    return max(matches, key=lambda rule: len(rule.prefix)).fsspec_options() if matches else {}


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **(options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


PROJECT_HOME_VARIABLE = "GENGRAM_HOME"


def absolute(url: str) -> str:
    """A local path made absolute; URLs unchanged. Tasks on other workers do not share the
    driver's cwd, and a job sent with `ray job submit --working-dir` runs in a throwaway copy
    of the tree, so relative paths resolve against $GENGRAM_HOME (the project root, which the
    local stack hands its jobs) when it is set, else against the cwd."""
    if protocol(url) != "file" or "://" in url:
        return url
    return os.path.abspath(os.path.join(os.environ.get(PROJECT_HOME_VARIABLE, ""), url))


SQLITE = "sqlite:///"


def absolute_sqlite(url: str) -> str:
    """A `sqlite:///` URL (MLflow's store, Optuna's study) with its relative path made absolute as
    `absolute` does, and its directory made; any other SQLAlchemy or HTTP URL unchanged."""
    if not url.startswith(SQLITE):
        return url
    path = absolute(url.removeprefix(SQLITE))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"{SQLITE}{path}"


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def open_url(url: str, mode: str = "rb", options: Mapping[str, Any] | None = None):
    return fsspec.open(url, mode, **(options or {}))


def exists(url: str, options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, options)
    fs.invalidate_cache(path)  # listings cached by object-store clients go stale when others write
    return fs.exists(path)


def read_bytes(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, options)
    return fs.cat_file(path)


def list_files(url: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Full URLs of the files directly under the directory `url` (none if it does not exist)."""
    fs, path = filesystem(url, options)
    fs.invalidate_cache(path)  # other processes may have written there since this one last looked
    if not fs.exists(path):
        return []
    names = sorted(info["name"] for info in fs.ls(path, detail=True) if info["type"] == "file")
    return [join(url, posixpath.basename(name)) for name in names]


def remove(url: str, options: Mapping[str, Any] | None = None) -> None:
    fs, path = filesystem(url, options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


@contextlib.contextmanager
def atomic_write(url: str, options: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Open `url` for writing so that it appears complete when the block succeeds, or not at all.

    Local files are written to a hidden sibling and renamed over the target (rename is atomic
    within a filesystem). Object stores publish an object only when its upload completes, so
    there a failed block aborts the upload instead; other remote filesystems write in place.
    """
    fs, path = filesystem(url, options)
    if is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as handle:
                yield handle
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        return
    handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        # Closing would commit what was written so far: abort the upload, then mark it closed.
        handle.discard()
        handle.closed = True
        raise
    handle.close()


@contextlib.contextmanager
def local_directory(url: str, options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """The files directly under the directory `url` on local disk, for libraries that read only local
    files (MLflow logs artifacts from them): the directory itself when it is local, else a copy that
    is removed when the block ends."""
    fs, path = filesystem(url, options)
    if is_local(fs):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="gengram-") as scratch:
        for file_url in list_files(url, options):
            name = posixpath.basename(file_url)
            fs.get(join(path, name), str(Path(scratch) / name))
        yield Path(scratch)


def write_bytes(url: str, data: bytes, options: Mapping[str, Any] | None = None) -> None:
    with atomic_write(url, options) as handle:
        handle.write(data)


def pyarrow_filesystem(url: str, options: Mapping[str, Any] | None = None):
    """(path, pyarrow filesystem) for pyarrow, Ray Data and Ray Train.

    A local path comes back absolute with no filesystem (pyarrow's own local one is used);
    anything else is wrapped from fsspec, so every option fsspec understands works there too.
    """
    import pyarrow.fs

    fs, path = filesystem(url, options)
    if is_local(fs):
        return path, None
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
