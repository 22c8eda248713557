"""Reading one input, in a Ray task: windows, filters and fragments in file order, as Arrow blocks
for the sink (the write pass) or as a histogram of selection buckets (the balancing pass)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from jobs.common.dataset import (
    shard_schema,
)
from jobs.common.fasta import InputError, read_fasta
from jobs.common.genes import GeneIndex
from jobs.tokenize.fragments import (
    BUCKETS,
    FragmentFilter,
    Fragments,
    FragmentSpec,
    InputStats,
    Windower,
    Windows,
    bucket_histogram,
)
from jobs.tokenize.plan import WorkItem


def input_windows(item: WorkItem, spec: FragmentSpec, stats: InputStats) -> Iterator[tuple[Windows, FragmentFilter]]:
    """Windows of one input, in file order, with the filter that judges them."""
    source = item.source()
    try:
        genes = None
        if item.annotation is not None and spec.gene_flank is not None:
            genes = GeneIndex.from_annotation(item.annotation_source(), spec.gene_flank)
        fragment_filter = FragmentFilter(spec, item.assembly, genes, stats)
        windower = Windower(spec, stats)
        for contig, ids in read_fasta(source):
            for windows in windower.feed(contig, ids):
                yield windows, fragment_filter
    except FileNotFoundError as error:
        raise InputError(str(error.filename or error), "file not found") from None
    for windows in windower.finish():
        yield windows, fragment_filter
    if genes is not None and not fragment_filter.annotated_contigs and stats.windows:
        raise InputError(item.annotation_source().name,
                         f"no contig of {source.name} has a gene in this annotation (do the contig names match?)")
    stats.size_bytes = source.size_bytes


def count_input(item: WorkItem, spec: FragmentSpec) -> Iterator[pa.Table]:
    """Balancing pass: tokens per selection bucket of the fragments that pass the filters."""
    histogram = np.zeros(BUCKETS, dtype=np.int64)
    for windows, fragment_filter in input_windows(item, spec, InputStats()):
        keep = fragment_filter.keep(windows)
        weights = windows.lengths[keep] * spec.strands_per_window
        histogram += bucket_histogram(fragment_filter.selection_keys(windows)[keep], weights)
    yield pa.table({"input": [item.index], "histogram": [histogram.tobytes()]})


def tokenize_input(item: WorkItem, spec: FragmentSpec, limits: dict[str, int], block_rows: int) -> Iterator[pa.Table]:
    """Write pass: Arrow blocks of one input's kept fragments, in file order, closed by a row
    that carries the input's statistics (so they reach the driver with the shard list)."""
    stats = InputStats()
    blocks = BlockBuilder(item, spec.seq_len, block_rows)
    for windows, fragment_filter in input_windows(item, spec, stats):
        fragments = fragment_filter.fragments(windows, limits[item.group])
        if fragments is not None:
            yield from blocks.add(fragments)
    yield from blocks.flush()
    yield blocks.closing_row(stats)


def block_schema(seq_len: int) -> pa.Schema:
    """Blocks between read and sink: Contract 2 columns plus what the sink needs to cut shards
    (split, bases per row, the row's ordinal within its input and split, the input) and the
    closing row's statistics. Nullable, for the closing row."""
    internal = [("_val", pa.bool_()), ("_tokens", pa.int64()), ("_ordinal", pa.int64()), ("_input", pa.int32()),
                ("_stats", pa.string())]
    return pa.schema([field.with_nullable(True) for field in shard_schema(seq_len)] + internal)


class BlockBuilder:
    """Arrow blocks of one input's fragments (see `block_schema`)."""

    def __init__(self, item: WorkItem, seq_len: int, block_rows: int):
        self.item, self.block_rows = item, block_rows
        self.schema = block_schema(seq_len)
        self.token_type = self.schema.field("tokens").type
        self.pending: list[Fragments] = []
        self.rows = 0
        self.next_ordinal = {False: 0, True: 0}  # by val

    def add(self, fragments: Fragments) -> Iterator[pa.Table]:
        self.pending.append(fragments)
        self.rows += len(fragments.starts)
        if self.rows >= self.block_rows:
            yield self.build()

    def flush(self) -> Iterator[pa.Table]:
        if self.pending:
            yield self.build()

    def build(self) -> pa.Table:
        pending, self.pending, rows, self.rows = self.pending, [], self.rows, 0
        # Token rows stay where parsing put them (a contiguous window block is used as it is): one
        # Arrow chunk per batch, its data buffer the token bytes (Contract 2).
        tokens = pa.chunked_array([
            pa.FixedSizeBinaryArray.from_buffers(self.token_type, len(f.starts),
                                                 [None, pa.py_buffer(np.ascontiguousarray(f.tokens))])
            for f in pending
        ])
        val = np.concatenate([f.val for f in pending])
        ordinal = np.empty(rows, dtype=np.int64)
        for flag in (False, True):
            mask = val == flag
            count = int(np.count_nonzero(mask))
            ordinal[mask] = self.next_ordinal[flag] + np.arange(count)
            self.next_ordinal[flag] += count
        columns = {
            "tokens": tokens,
            "assembly": pa.array([self.item.assembly] * rows, pa.string()),
            "organism": pa.array([self.item.organism] * rows, pa.string()),
            "group": pa.array([self.item.group] * rows, pa.string()),
            "contig": pa.array(np.repeat([f.contig for f in pending], [len(f.starts) for f in pending]), pa.string()),
            "start": pa.array(np.concatenate([f.starts for f in pending]), pa.int64()),
            "strand": pa.array(np.where(np.concatenate([f.reverse for f in pending]), "-", "+"), pa.string()),
            "_val": pa.array(val),
            "_tokens": pa.array(np.concatenate([f.lengths for f in pending]), pa.int64()),
            "_ordinal": pa.array(ordinal),
            "_input": pa.array(np.full(rows, self.item.index, dtype=np.int32)),
            "_stats": pa.nulls(rows, pa.string()),
        }
        return pa.Table.from_pydict(columns, schema=self.schema)

    def closing_row(self, stats: InputStats) -> pa.Table:
        row = {field.name: pa.nulls(1, field.type) for field in self.schema}
        row["_input"] = pa.array([self.item.index], pa.int32())
        row["_stats"] = pa.array([stats.to_json()])
        return pa.Table.from_pydict(row, schema=self.schema)
