"""Ray Data's side of writing: each input's fragments as that input's shards, each file atomic."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from jobs.common import storage
from jobs.common.dataset import (
    PARQUET_OPTIONS,
    SHARD_COLUMNS,
    shard_path,
    shard_schema,
)
from jobs.tokenize.plan import Plan


class ShardStream:
    """One input's fragments of one split -> shards, each file written atomically. Row groups
    hold exactly `group_rows` rows (a shard's last one may hold fewer) and a shard closes at the
    first row group that takes its file past `shard_bytes`: sizes follow from the rows alone,
    whatever the blocks Ray Data hands over."""

    def __init__(self, sink: ShardSink, split: str, input_index: int):
        self.sink, self.split, self.input_index = sink, split, input_index
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.next_ordinal = 0
        self.part = 0
        self.shard: tuple[contextlib.ExitStack, Any, pq.ParquetWriter] | None = None
        self.shard_rows = self.shard_tokens = 0
        self.records: list[dict] = []

    def add(self, table: pa.Table) -> None:
        first, last = table["_ordinal"][0].as_py(), table["_ordinal"][-1].as_py()
        if first != self.next_ordinal or last != first + len(table) - 1:
            raise RuntimeError(
                f"input {self.input_index} ({self.split}): rows {first}..{last} arrived, {self.next_ordinal} "
                "expected next; Ray Data split one input's stream over several write tasks"
            )
        self.next_ordinal = last + 1
        self.pending.append(table)
        self.pending_rows += len(table)
        while self.pending_rows >= self.sink.group_rows:
            self._write(self._take(self.sink.group_rows))

    def close(self) -> list[dict]:
        if self.pending_rows:
            self._write(self._take(self.pending_rows))
        if self.shard:
            self._finish()
        return self.records

    def abort(self, error: BaseException) -> None:
        if self.shard:
            stack, _, writer = self.shard
            with contextlib.suppress(Exception):
                writer.close()
            stack.__exit__(type(error), error, error.__traceback__)  # discards the unfinished file

    def _take(self, rows: int) -> pa.Table:
        table = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        rest = table.slice(rows)
        self.pending, self.pending_rows = ([rest] if len(rest) else []), self.pending_rows - rows
        return table.slice(0, rows)

    def _write(self, table: pa.Table) -> None:
        if self.shard is None:
            stack = contextlib.ExitStack()
            url = storage.join(self.sink.output, shard_path(self.split, self.input_index, self.part))
            handle = stack.enter_context(storage.atomic_write(url, self.sink.options))
            writer = pq.ParquetWriter(handle, self.sink.schema, compression_level=self.sink.zstd_level,
                                      **PARQUET_OPTIONS)
            self.shard = (stack, handle, writer)
        self.shard[2].write_table(table.select(SHARD_COLUMNS).cast(self.sink.schema),
                                  row_group_size=self.sink.group_rows)
        self.shard_rows += len(table)
        self.shard_tokens += pc.sum(table["_tokens"]).as_py()
        if self.shard[1].tell() >= self.sink.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        stack, handle, writer = self.shard
        writer.close()
        size = handle.tell()
        stack.close()  # publishes the file
        path = shard_path(self.split, self.input_index, self.part)
        self.records.append({"path": path, "split": self.split, "input": self.input_index,
                             "rows": self.shard_rows, "tokens": self.shard_tokens, "bytes": size})
        self.shard, self.shard_rows, self.shard_tokens, self.part = None, 0, 0, self.part + 1


class ShardSink(Datasink):
    """Writes the fragments of each input it is handed as that input's shards."""

    def __init__(self, plan: Plan):
        self.output, self.options = plan.output, plan.output_options
        self.schema = shard_schema(plan.config.seq_len)
        self.shard_bytes, self.group_rows = plan.shard_bytes, plan.group_rows
        self.zstd_level = plan.config.zstd_level
        self.results: list[dict] = []

    def get_name(self) -> str:
        return "WriteShards"

    def write(self, blocks: Iterable, ctx) -> dict:
        streams: dict[str, ShardStream] = {}
        input_index = stats = None
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if not len(table):
                    continue
                indices = pc.unique(table["_input"]).to_pylist()
                input_index = indices[0] if input_index is None else input_index
                if indices != [input_index] or stats is not None:
                    raise RuntimeError(f"a write task received rows of inputs {sorted({input_index, *indices})} "
                                       "or rows after an input's closing row")
                if table["_stats"].null_count < len(table):  # the input's closing row, always its last
                    stats, table = table["_stats"][-1].as_py(), table.slice(0, len(table) - 1)
                for split, part in _by_split(table).items():
                    streams.setdefault(split, ShardStream(self, split, input_index)).add(part)
            if stats is None:
                raise RuntimeError(f"input {input_index}: the stream ended before its closing row")
            return {"input": input_index, "stats": stats,
                    "shards": [record for stream in streams.values() for record in stream.close()]}
        except BaseException as error:
            for stream in streams.values():
                stream.abort(error)
            raise

    def on_write_complete(self, write_result) -> None:
        self.results = write_result.write_returns


def _by_split(table: pa.Table) -> dict[str, pa.Table]:
    """The rows of each split, in order, as slices of `table` (no copy: val rows are few and
    most of a block is long runs of train rows)."""
    if not len(table):
        return {}
    val = table["_val"].to_numpy(zero_copy_only=False)
    bounds = np.concatenate([[0], np.flatnonzero(val[1:] != val[:-1]) + 1, [len(val)]])
    parts: dict[str, list[pa.Table]] = {}
    for begin, end in itertools.pairwise(bounds):
        parts.setdefault("val" if val[begin] else "train", []).append(table.slice(begin, end - begin))
    return {split: pa.concat_tables(tables) for split, tables in parts.items()}
