"""Contracts 2 and 3 of ARCHITECTURE.md, defined once: the shard schema, the manifest and the
dataset layout. The tokenize job writes with these definitions; the pretraining job and every
other reader load and check a dataset through `load_manifest`, `check_compatible`,
`split_paths` and `read_eval_rows`.

Layout of a dataset (a local directory or any fsspec URL):

    <dataset>/manifest.json                       written last: its presence means complete
    <dataset>/train/part-<input>-<part>.parquet   one row per fragment, Contract 2 columns
    <dataset>/val/part-<input>-<part>.parquet

Shards hold fragments of one input each, in the input's order (contig order in the file,
then start, then strand), so their names and bytes follow from the config and the inputs.
Neighbouring rows are neighbouring windows of one genome: a trainer should shuffle across
shards and rows (e.g. Ray Data's `randomize_block_order` and a local shuffle buffer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from jobs.common import storage
from jobs.common.config import ConfigError, StrictModel
from model.vocab import TOKENS, VOCAB_SIZE

SCHEMA_VERSION = 2
# Version 1 stored tokens as list<uint8>, which Parquet writes as one INT32 with repetition and
# definition levels per token: a third of gunzip's speed before any other work.
MANIFEST_NAME = "manifest.json"
Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
SHARD_COLUMNS = ("tokens", "assembly", "organism", "group", "contig", "start", "strand")


def tokens_type(seq_len: int) -> pa.DataType:
    """Contract 2: byte i of a row's value is the token id at position i."""
    return pa.binary(seq_len)


def shard_schema(seq_len: int) -> pa.Schema:
    """Contract 2. Tokens are one fixed-size binary value per row, so a reader gets an (rows, seq_len)
    array from the column's data buffer without copying (`tokens_array`)."""
    return pa.schema(
        [
            pa.field("tokens", tokens_type(seq_len), nullable=False),
            pa.field("assembly", pa.string(), nullable=False),
            pa.field("organism", pa.string(), nullable=False),
            pa.field("group", pa.string(), nullable=False),
            pa.field("contig", pa.string(), nullable=False),
            pa.field("start", pa.int64(), nullable=False),
            pa.field("strand", pa.string(), nullable=False),
        ]
    )


# Parquet settings every shard is written with. Tokens are a FIXED_LEN_BYTE_ARRAY written PLAIN:
# one memcpy-like pass, and zstd takes it to ~0.3 bytes per token; dictionaries suit the repeated strings.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["assembly", "organism", "group", "contig", "strand"],
    "column_encoding": {"tokens": "PLAIN", "start": "DELTA_BINARY_PACKED"},
    "write_statistics": ["assembly", "organism", "group", "contig", "start", "strand"],
}


def shard_path(split: Split, input_index: int, part: int) -> str:
    """Shard path relative to the dataset root."""
    return f"{split}/part-{input_index:05d}-{part:05d}.parquet"


class Vocabulary(StrictModel):
    tokens: list[str]
    size: int

    @classmethod
    def current(cls) -> Vocabulary:
        return cls(tokens=list(TOKENS), size=VOCAB_SIZE)


class ShardRecord(StrictModel):
    path: str  # relative to the dataset root
    split: Split
    input: int  # index into Manifest.inputs
    rows: int
    tokens: int  # bases, PAD excluded
    bytes: int


class InputRecord(StrictModel):
    index: int
    url: str
    assembly: str
    organism: str
    group: str
    annotation: str | None
    size_bytes: int | None  # of the file as stored (None when the server does not say)
    contigs: int
    empty_records: int
    bases: int
    windows: int  # seq_len windows cut from the contigs, before any filter
    padded: int  # final partial windows kept and padded with PAD
    fragments_kept: int
    dropped: dict[str, int]  # fragments dropped, by reason
    tokens: dict[Split, int]


class Totals(StrictModel):
    fragments: dict[Split, dict[str, int]]  # split -> group -> fragments
    tokens: dict[Split, dict[str, int]]  # split -> group -> bases


class Shares(StrictModel):
    target: dict[str, float]
    achieved: dict[str, float]  # by tokens, both splits together
    achieved_by_split: dict[Split, dict[str, float]]


class Manifest(StrictModel):
    """Contract 3: what a complete dataset holds and how it was made."""

    schema_version: int
    created_by: str
    seq_len: int
    vocabulary: Vocabulary
    config: dict[str, Any]  # the full resolved job config; it holds no credentials by construction
    config_hash: str  # over everything that decides the content (not where it is written)
    inputs: list[InputRecord]
    totals: Totals
    shares: Shares
    shards: list[ShardRecord]

    def shards_of(self, split: Split) -> list[ShardRecord]:
        return [shard for shard in self.shards if shard.split == split]

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=1) + "\n").encode()


def manifest_url(dataset_url: str) -> str:
    return storage.join(dataset_url, MANIFEST_NAME)


def load_manifest(
    dataset_url: str, storage_options: Mapping[str, Any] | None = None, *, seq_len: int | None = None
) -> Manifest:
    """Read and check a dataset's manifest: schema version, vocabulary and (if given) seq_len."""
    url = manifest_url(dataset_url)
    try:
        data = json.loads(storage.read_bytes(url, storage_options))
    except FileNotFoundError:
        raise ConfigError(
            f"{dataset_url} is not a complete dataset: it has no {MANIFEST_NAME} "
            "(a dataset becomes visible only when its manifest is written, last)"
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{dataset_url}: dataset of schema version {version!r}, this code reads version {SCHEMA_VERSION}; "
            f"rebuild it: python -m jobs.tokenize --config <its config> force=true (the config it was made with "
            f"is under `config` in {MANIFEST_NAME})"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{url} is not a valid manifest: {error}") from None
    if manifest.vocabulary != Vocabulary.current():
        raise ConfigError(
            f"{url}: vocabulary {manifest.vocabulary.tokens} differs from this code's {list(TOKENS)} (Contract 1)"
        )
    if seq_len is not None and manifest.seq_len != seq_len:
        raise ConfigError(f"{url}: fragments are {manifest.seq_len} tokens long, expected {seq_len}")
    return manifest


def check_compatible(manifest: Manifest, *, vocab_size: int, max_seq_len: int, source: str = "dataset") -> None:
    """Refuse a dataset a model cannot consume: token ids beyond its vocabulary or rows longer than its context."""
    if manifest.vocabulary.size > vocab_size:
        raise ConfigError(f"{source}: token ids go up to {manifest.vocabulary.size - 1}, the model has {vocab_size}")
    if manifest.seq_len > max_seq_len:
        raise ConfigError(f"{source}: fragments are {manifest.seq_len} tokens, the model's context is {max_seq_len}")


def split_paths(
    manifest: Manifest, split: Split, dataset_url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[list[str], Any]:
    """(shard paths, pyarrow filesystem or None) of one split, in manifest order, for
    `ray.data.read_parquet(paths, filesystem=fs)` or `pyarrow.parquet`."""
    root, fs = storage.pyarrow_filesystem(dataset_url, storage_options)
    return [storage.join(root, shard.path) for shard in manifest.shards_of(split)], fs


def tokens_array(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The tokens column as an (rows, seq_len) uint8 array: a view of the column's data buffer (no
    copy, no per-row Python) when the column is one chunk, as a record batch always is."""
    column = table.column("tokens")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    seq_len = column.type.byte_width
    data = column.buffers()[1]
    rows = np.frombuffer(data, dtype=np.uint8, count=(column.offset + len(column)) * seq_len)
    return rows.reshape(-1, seq_len)[column.offset :]


def read_eval_rows(
    manifest: Manifest, dataset_url: str, storage_options: Mapping[str, Any] | None = None, *, limit: int
) -> np.ndarray:
    """Up to `limit` validation fragments as an (rows, seq_len) uint8 array, in manifest order."""
    paths, fs = split_paths(manifest, "val", dataset_url, storage_options)
    rows: list[np.ndarray] = []
    remaining = limit
    for path in paths:
        if remaining <= 0:
            break
        table = pq.read_table(path, columns=["tokens"], filesystem=fs).slice(0, remaining)
        rows.append(tokens_array(table))
        remaining -= len(rows[-1])
    return np.concatenate(rows) if rows else np.empty((0, manifest.seq_len), dtype=np.uint8)
