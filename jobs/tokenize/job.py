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
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from jobs.common import storage
from jobs.common.config import ConfigError, config_to_dict
from jobs.common.dataset import (
    SCHEMA_VERSION,
    SPLITS,
    InputRecord,
    Manifest,
    ShardRecord,
    Shares,
    Totals,
    Vocabulary,
    load_manifest,
    manifest_url,
)
from jobs.common.fasta import InputError
from jobs.common.ray_session import ensure_ray
from jobs.tokenize.config import TokenizeConfig
from jobs.tokenize.datasource import read_dataset
from jobs.tokenize.fragments import (
    BUCKETS,
    DROP_REASONS,
    KEEP_ALL,
    FragmentSpec,
    InputStats,
    selection_limits,
)
from jobs.tokenize.plan import BLOCK_BYTES, Plan, make_plan
from jobs.tokenize.reading import count_input, tokenize_input
from jobs.tokenize.sink import ShardSink


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
