"""Contract 4 of ARCHITECTURE.md: what an evaluation leaves in its output directory (local or object store).

    <output>/embeddings/<model identity>/<task name>-<task key>/<split>/layer-<l>.parquet   (kmer: features.parquet)
    <output>/scores/<model identity>/<task name>-<task key>.parquet       zero-shot variant scores
    <output>/plots/*.png, <output>/comparison.md, <output>/comparison.csv
    <output>/results.json                                                 written last: the evaluation is complete

An embeddings file has one row per example: `id` (string), `label` (int64), `embedding`
(fixed_size_list<float32>[hidden]). The task key hashes the task's content and every embedding setting
that changes a vector (pooling, reverse complement, long-sequence handling, zero-shot window), so a re-run
reuses exactly the files whose inputs are unchanged. Every file is written whole or not at all.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import storage
from jobs.common.config import config_hash

RESULTS = "results.json"
RESULTS_VERSION = 1
FEATURES = "features"  # the file stem of a model with one representation (the k-mer spectrum)


@dataclass(frozen=True)
class MetricRow:
    """One number of an evaluation; `probe` is `zero_shot` for variant scores, `layer` None for a model
    with one representation."""

    task: str
    model: str
    probe: str
    layer: int | None
    split: str
    metric: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None


def slug(text: str) -> str:
    """`text` as one path segment: runs of anything but letters, digits, `_`, `.` and `-` become `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def task_key(content_hash: str, settings: Mapping[str, Any]) -> str:
    return config_hash({"content": content_hash, **settings})[:12]


def embeddings_url(output: str, identity: str, task: str, key: str, split: str, layer: int | None) -> str:
    stem = FEATURES if layer is None else f"layer-{layer}"
    return storage.join(output, "embeddings", identity, f"{task}-{key}", split, f"{stem}.parquet")


def scores_url(output: str, identity: str, task: str, key: str) -> str:
    return storage.join(output, "scores", identity, f"{task}-{key}.parquet")


def embeddings_table(ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
    })


def vectors_of(table: pa.Table) -> np.ndarray:
    """The embedding column as one [rows, hidden] view of its buffer."""
    column = table["embedding"].combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def write_table(url: str, table: pa.Table, options: Mapping[str, Any] | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(url, buffer.getvalue(), options)


def read_table(url: str, options: Mapping[str, Any] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url, options)))


def write_results(output: str, config: Mapping[str, Any], rows: list[MetricRow], files: Mapping[str, Any],
                  extra: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> str:
    url = storage.join(output, RESULTS)
    document = {"version": RESULTS_VERSION, "config": config, "metrics": [asdict(row) for row in rows],
                "files": files, **extra}
    storage.write_bytes(url, json.dumps(document, indent=2, default=float).encode(), options)
    return url


def read_results(output: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(output, RESULTS), options))
