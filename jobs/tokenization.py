"""The tokenize job: genomes on any fsspec URL -> a dataset of Parquet shards (Contracts 1-3).

Flow (run):
  1. plan      resolve inputs and check config, groups and the output; no Ray yet
  2. balance   if groups must be balanced (several groups or a token budget): a Ray Data pass
               that parses every input and returns, per input, a histogram of tokens over
               selection buckets; the driver turns them into per-group bucket limits
  3. write     a Ray Data pass: GenomeDatasource (one read task per input, streaming the file
               and yielding Arrow blocks of fragments, then a closing row with the input's
               statistics) -> ShardSink, fused into one task per input, writing its shards
  4. commit    remove files a crashed or replaced run left behind, then write manifest.json

Determinism: every per-fragment choice is a seeded hash of (assembly, contig, start); each
shard holds one input's fragments in file order, is named by (split, input, part), and has
row groups of a fixed row count, closing at the first row group past the size target, so
names and bytes do not depend on scheduling or on how Ray Data chunks blocks. A re-run redoes
the work and overwrites files with the same bytes; since each file is written atomically and
the manifest last, a crash at any point leaves no visible dataset, and the re-run ends exactly
where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator
from ray.data import Datasource, ReadTask, read_datasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasink

from jobs import storage
from jobs.assemblies import BUNDLED, NCBI_DATASETS_API, InputSpec, load_assembly_list
from jobs.cluster import ensure_ray
from jobs.config import ConfigError, StrictModel, config_hash, config_to_dict
from jobs.dataset import (
    PARQUET_OPTIONS,
    SCHEMA_VERSION,
    SHARD_COLUMNS,
    SPLITS,
    InputRecord,
    Manifest,
    ShardRecord,
    Shares,
    Totals,
    Vocabulary,
    load_manifest,
    manifest_url,
    shard_path,
    shard_schema,
)
from jobs.fasta import InputError, Source, ncbi_member, read_fasta
from jobs.fragments import (
    BUCKETS,
    DROP_REASONS,
    KEEP_ALL,
    FragmentFilter,
    Fragments,
    FragmentSpec,
    InputStats,
    Windower,
    Windows,
    bucket_histogram,
    selection_limits,
)
from jobs.genes import GeneIndex
from jobs.storage import StorageRule

BLOCK_BYTES = 32 << 20  # token payload per Arrow block handed to Ray Data
ROW_GROUP_BYTES = 64 << 20  # token payload per Parquet row group


class TokenizeConfig(StrictModel):
    # What to read: inline inputs, or assembly list files (YAML, any URL) holding them.
    inputs: list[InputSpec] = Field(default_factory=list)
    manifest: str | list[str] | None = None
    output: str  # dataset directory or URL
    seq_len: int = Field(8192, ge=8)  # 8192 for stage I, 32768 for the long-context stage
    final_window: Literal["drop", "pad"] = "drop"  # a contig's last, partial window
    strand: Literal["forward", "random", "both"] = "forward"
    reverse_prob: float = Field(0.56, ge=0, le=1)  # strand=random: share of reverse complements
    min_acgt_fraction: float = Field(0.9, ge=0, le=1)  # of a fragment's bases
    gene_flank: int | None = Field(5120, ge=0)  # with an annotation: keep fragments this close to a gene
    group_shares: dict[str, float] = Field(default_factory=lambda: {"human": 0.5, "non-human": 0.5})
    token_budget: int | None = Field(None, ge=1)  # total bases kept, both splits
    val_fraction: float = Field(0.01, ge=0, lt=1)
    seed: int = 0
    shard_mib: float = Field(256, gt=0)  # shard file size: a shard closes at the first row group past it
    zstd_level: int = Field(1, ge=-7, le=22)
    storage: list[StorageRule] = Field(default_factory=list)  # endpoints and anonymous access, no secrets
    force: bool = False  # replace a finished dataset at `output`

    @model_validator(mode="after")
    def _consistent(self) -> TokenizeConfig:
        if bool(self.inputs) == bool(self.manifest):
            raise ValueError("give exactly one of `inputs` (a list) or `manifest` (an assembly list file)")
        if any(share < 0 for share in self.group_shares.values()) or not self.group_shares:
            raise ValueError("group_shares must map groups to non-negative shares")
        if abs(sum(self.group_shares.values()) - 1) > 1e-6:
            raise ValueError(f"group_shares must sum to 1, not {sum(self.group_shares.values())}")
        return self

    def fragment_spec(self) -> FragmentSpec:
        return FragmentSpec(
            seq_len=self.seq_len,
            pad_final=self.final_window == "pad",
            min_acgt_fraction=self.min_acgt_fraction,
            gene_flank=self.gene_flank,
            strand=self.strand,
            reverse_prob=self.reverse_prob,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )


# Keys that say where a dataset goes, or how its inputs are listed, rather than what it holds:
# they stay out of its hash, which covers the resolved inputs instead.
PLACEMENT_KEYS = ("output", "storage", "force", "inputs", "manifest")


@dataclass(frozen=True)
class WorkItem:
    """Everything a read task needs about one input."""

    index: int
    assembly: str
    organism: str
    group: str
    url: str  # absolute when local: tasks do not share the driver's working directory
    options: dict
    annotation: str | None
    annotation_options: dict

    def source(self) -> Source:
        return Source(self.url, self.options, ncbi_member(self.assembly))

    def annotation_source(self) -> Source:
        if self.annotation == BUNDLED:
            return Source(self.url, self.options, ncbi_member(self.assembly, annotation=True))
        return Source(self.annotation, self.annotation_options, ncbi_member(self.assembly, annotation=True))


@dataclass(frozen=True)
class Plan:
    config: TokenizeConfig
    inputs: list[InputSpec]  # resolved, as recorded in the manifest
    items: list[WorkItem]
    config_hash: str
    output: str
    output_options: dict
    shard_bytes: int
    group_rows: int

    @property
    def needs_balancing(self) -> bool:
        return len(self.config.group_shares) > 1 or self.config.token_budget is not None


def make_plan(config: TokenizeConfig) -> Plan:
    """Resolve and check everything that can be checked before any Ray work."""
    rules = list(config.storage)
    if config.manifest:
        specs = []
        for url in [config.manifest] if isinstance(config.manifest, str) else config.manifest:
            assemblies = load_assembly_list(url, config.storage)
            specs += assemblies.inputs
            rules += assemblies.storage  # after the job's own rules, which win ties
    else:
        specs = [spec.resolved() for spec in config.inputs]
    _check_inputs(specs, config)
    items = [
        WorkItem(
            index=index,
            assembly=spec.assembly,
            organism=spec.organism,
            group=spec.group,
            url=storage.absolute(spec.url),
            options=storage.options_for(spec.url, rules),
            annotation=spec.annotation if spec.annotation in (None, BUNDLED) else storage.absolute(spec.annotation),
            annotation_options=storage.options_for(spec.annotation or "", rules),
        )
        for index, spec in enumerate(specs)
    ]
    content = {key: value for key, value in config_to_dict(config).items() if key not in PLACEMENT_KEYS}
    content["inputs"] = [spec.model_dump(mode="json") for spec in specs]
    output = storage.absolute(config.output)
    shard_bytes = int(config.shard_mib * (1 << 20))
    return Plan(config, specs, items, config_hash(content), output, storage.options_for(output, rules),
                shard_bytes, group_rows(config.seq_len, shard_bytes))


def _check_inputs(specs: list[InputSpec], config: TokenizeConfig) -> None:
    assemblies = Counter(spec.assembly for spec in specs)
    repeated = sorted(name for name, count in assemblies.items() if count > 1)
    if repeated:
        raise ConfigError(f"assembly ids must be unique (they seed the split and strand hashes): {repeated}")
    groups = {spec.group for spec in specs}
    unknown = sorted(groups - set(config.group_shares))
    if unknown:
        raise ConfigError(f"inputs have groups {unknown} that group_shares does not list ({config.group_shares})")
    empty = sorted(group for group, share in config.group_shares.items() if share > 0 and group not in groups)
    if empty:
        raise ConfigError(f"group_shares gives a share to {empty}, but no input has that group")
    bundled = [spec.assembly for spec in specs if spec.annotation == BUNDLED and not _is_package(spec.url)]
    if bundled:
        raise ConfigError(f"`annotation: {BUNDLED}` needs an NCBI Datasets package (an accession or a .zip); "
                          f"not so for {bundled}")


def _is_package(url: str) -> bool:
    return url.startswith(NCBI_DATASETS_API) or url.split("?")[0].endswith(".zip")


def group_rows(seq_len: int, shard_bytes: int) -> int:
    """Rows per Parquet row group: ROW_GROUP_BYTES of tokens, or fewer for shards smaller than
    that, so that a shard (tokens compress to about a third) holds several row groups and a
    reader can stream it."""
    return max(1, min(ROW_GROUP_BYTES, shard_bytes) // seq_len)


# --- reading one input (runs in a Ray task) --------------------------------------------------------


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
        # Token rows stay where parsing put them: one Arrow chunk per batch, no copy.
        tokens = pa.chunked_array(
            [pa.FixedSizeListArray.from_arrays(pa.array(f.tokens.reshape(-1)), type=self.token_type) for f in pending]
        )
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


# --- Ray Data ---------------------------------------------------------------------------------------


class GenomeDatasource(Datasource):
    """One read task per input; `read(item)` streams that input and yields Arrow blocks."""

    def __init__(self, items: list[WorkItem], read: functools.partial, name: str):
        self.items, self.read, self.name = items, read, name

    def get_name(self) -> str:
        return self.name

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(self.read, item),
                     BlockMetadata(num_rows=None, size_bytes=None, input_files=[item.url], exec_stats=None))
            for item in self.items
        ]


def read_dataset(items: list[WorkItem], read: functools.partial, name: str):
    # As many output blocks as inputs: Ray Data then neither splits a read task's output nor
    # separates it from a following sink, so each input is read and written by one task. The
    # sink checks it: an input's rows must arrive in order, ending with its closing row.
    dataset = read_datasource(GenomeDatasource(items, read, name), override_num_blocks=len(items))
    # Both passes are one fused operator (read -> count, or read -> write). Ray Data's per-operator
    # reservation holds back half the cluster's CPUs for operators this plan does not have: with
    # it, two inputs on two CPUs ran one at a time (benchmarks/tokenize.py: 1.26x, 1.95x without).
    dataset.context.op_resource_reservation_enabled = False
    return dataset


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


# --- the job ----------------------------------------------------------------------------------------


def run(config: TokenizeConfig) -> Manifest:
    """Tokenise per `config` and return the manifest of the finished dataset."""
    job = make_plan(config)
    existing = _existing(job)
    if existing is not None:
        print(f"{job.config.output} already holds this dataset (config hash {job.config_hash[:12]}): nothing to do;"
              " set force=true to rebuild it", flush=True)
        return existing

    ensure_ray()
    spec = config.fragment_spec()
    limits = balance(job, spec) if job.needs_balancing else dict.fromkeys(config.group_shares, KEEP_ALL)
    records, stats = write(job, spec, limits)
    return commit(job, records, stats)


def _existing(job: Plan) -> Manifest | None:
    """The finished dataset at the output if it is this one; refuse to overwrite another unless forced."""
    if not storage.exists(manifest_url(job.output), job.output_options):
        return None
    if job.config.force:
        storage.remove(manifest_url(job.output), job.output_options)  # first: the old dataset goes as a whole
        return None
    current = load_manifest(job.output, job.output_options)
    if current.config_hash != job.config_hash:
        raise ConfigError(
            f"{job.config.output} holds a dataset made with another config (hash {current.config_hash[:12]}, this "
            f"one {job.config_hash[:12]}); choose another output or set force=true to replace it"
        )
    return current


def balance(job: Plan, spec: FragmentSpec) -> dict[str, int]:
    """Per-group selection limits, from a first pass that counts instead of writing.

    Why count first rather than write every fragment and thin the shards afterwards: at the
    paper's scale the human haplotypes outnumber the other primates about fifteen to one, so
    most human fragments are dropped, and encoding them to Parquet costs several times what
    reading an input again does (decompression dominates a pass without writing).
    """
    histograms = {group: np.zeros(BUCKETS, dtype=np.int64) for group in job.config.group_shares}
    dataset = read_dataset(job.items, functools.partial(count_input, spec=spec), "CountFragments")
    with input_errors_unwrapped():
        rows = dataset.take_all()
    for row in rows:
        histograms[job.items[row["input"]].group] += np.frombuffer(row["histogram"], dtype=np.int64)
    return selection_limits(histograms, job.config.group_shares, job.config.token_budget)


def write(job: Plan, spec: FragmentSpec, limits: dict[str, int]) -> tuple[list[ShardRecord], dict[int, InputStats]]:
    read = functools.partial(tokenize_input, spec=spec, limits=limits, block_rows=max(1, BLOCK_BYTES // spec.seq_len))
    sink = ShardSink(job)
    with input_errors_unwrapped():
        read_dataset(job.items, read, "Tokenize").write_datasink(sink)
    records = [ShardRecord(**record) for result in sink.results for record in result["shards"]]
    return records, {result["input"]: InputStats.from_json(result["stats"]) for result in sink.results}


@contextlib.contextmanager
def input_errors_unwrapped() -> Iterator[None]:
    """An InputError raised in a Ray task reaches the caller as itself, not wrapped by Ray."""
    try:
        yield
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise InputError(cause.source, cause.problem, cause.record, cause.line) from None


def commit(job: Plan, records: list[ShardRecord], stats: dict[int, InputStats]) -> Manifest:
    records = sorted(records, key=lambda record: record.path)
    for item in job.items:
        written = sum(record.rows for record in records if record.input == item.index)
        if item.index not in stats or written != stats[item.index].kept:
            raise RuntimeError(f"input {item.index}: {written} fragments in shards, "
                               f"{stats[item.index].kept if item.index in stats else '?'} kept")
    # Files here that this run did not write come from a crashed run or a replaced dataset.
    kept = {record.path for record in records}
    for split in SPLITS:
        for url in storage.list_files(storage.join(job.output, split), job.output_options):
            if f"{split}/{os.path.basename(url)}" not in kept:
                storage.remove(url, job.output_options)
    manifest = build_manifest(job, records, stats)
    storage.write_bytes(manifest_url(job.output), manifest.to_json(), job.output_options)
    return manifest


def build_manifest(job: Plan, records: list[ShardRecord], stats: dict[int, InputStats]) -> Manifest:
    groups = list(job.config.group_shares)
    fragments = {split: dict.fromkeys(groups, 0) for split in SPLITS}
    tokens = {split: dict.fromkeys(groups, 0) for split in SPLITS}
    for record in records:
        group = job.items[record.input].group
        fragments[record.split][group] += record.rows
        tokens[record.split][group] += record.tokens
    inputs = []
    for item, spec in zip(job.items, job.inputs, strict=True):
        item_stats = stats[item.index]
        inputs.append(InputRecord(
            index=item.index, url=spec.url, assembly=spec.assembly, organism=spec.organism, group=spec.group,
            annotation=spec.annotation, size_bytes=item_stats.size_bytes, contigs=item_stats.contigs,
            empty_records=item_stats.empty_records, bases=item_stats.bases, windows=item_stats.windows,
            padded=item_stats.padded, fragments_kept=item_stats.kept,
            dropped={reason: item_stats.dropped[reason] for reason in DROP_REASONS},
            tokens={split: item_stats.tokens[split] for split in SPLITS},
        ))
    total = sum(sum(by_group.values()) for by_group in tokens.values())
    achieved = {group: _share(sum(tokens[split][group] for split in SPLITS), total) for group in groups}
    by_split = {split: {group: _share(tokens[split][group], sum(tokens[split].values())) for group in groups}
                for split in SPLITS}
    return Manifest(
        schema_version=SCHEMA_VERSION,
        created_by=f"jobs.tokenize (pyarrow {pa.__version__})",
        seq_len=job.config.seq_len,
        vocabulary=Vocabulary.current(),
        config=config_to_dict(job.config),
        config_hash=job.config_hash,
        inputs=inputs,
        totals=Totals(fragments=fragments, tokens=tokens),
        shares=Shares(target=dict(job.config.group_shares), achieved=achieved, achieved_by_split=by_split),
        shards=records,
    )


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def summary(manifest: Manifest) -> str:
    """The end-of-job table: per input, then per split and group."""
    lines = [f"{'#':>3} {'assembly':<28} {'group':<10} {'bases':>14} {'kept':>10} "
             + " ".join(f"{reason:>10}" for reason in DROP_REASONS) + f" {'train tok':>14} {'val tok':>12}"]
    for record in manifest.inputs:
        lines.append(
            f"{record.index:>3} {record.assembly[:28]:<28} {record.group[:10]:<10} {record.bases:>14,} "
            f"{record.fragments_kept:>10,} " + " ".join(f"{record.dropped[r]:>10,}" for r in DROP_REASONS)
            + f" {record.tokens['train']:>14,} {record.tokens['val']:>12,}"
        )
    lines.append("")
    lines.append(f"{'split':<6} {'group':<12} {'fragments':>12} {'tokens':>16} {'share':>8}")
    for split in SPLITS:
        for group, count in manifest.totals.fragments[split].items():
            lines.append(f"{split:<6} {group:<12} {count:>12,} {manifest.totals.tokens[split][group]:>16,} "
                         f"{manifest.shares.achieved_by_split[split][group]:>8.2%}")
    shares = ", ".join(f"{group} {share:.2%} (target {manifest.shares.target[group]:.0%})"
                       for group, share in manifest.shares.achieved.items())
    lines.append(f"shares by tokens: {shares}; {len(manifest.shards)} shards")
    return "\n".join(lines)
