"""Evaluation task sources: where a task's examples come from (`tasks[].source` of the config, keyed by
`type`), read into one table per task in one normalised form.

- `fasta` (classification): one FASTA per class; train/test by a seeded hash of the record id.
- `genomic_benchmarks` (classification): `<root>/<task>/{train,test}/<class>/*.txt`, as the
  `genomic-benchmarks` package downloads a task.
- `table` (classification): Parquet/CSV/TSV/JSONL files per split (the Nucleotide Transformer downstream
  tasks, the Genos benchmarks), or a dataset `datasets.load_dataset` reads.
- `jaspar` (classification, semi-synthetic): sites sampled from a JASPAR profile planted in background
  windows, against planted dinucleotide-shuffled sites.
- `variants` (variant_effect): SNVs as contig/position/ref/alt against a reference FASTA, or as ref/alt
  sequence pairs.

Every sequence is normalised with the project vocabulary (Contract 1): soft-masked lower case becomes its
base, IUPAC codes N, anything else is an error naming the file, the record and, for line-based files, the
line. Labels become class indices in sorted order of their values, so integer labels 0..n-1 keep their
values and any other integers ({1, 2}, {-1, 1}) are renumbered by rank; `classes[i]` is the value label i
stood for, as text.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet
from pydantic import Field, field_validator, model_validator

from jobs.common import motifs, storage
from jobs.common.config import ConfigError, StrictModel
from jobs.common.fasta import InputError, Source, read_fasta
from jobs.common.storage import StorageRule, options_for
from model.vocab import InvalidSequenceError, N, decode, encode, reverse_complement

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "validation": "validation", "eval": "validation", "test": "test"}
CLASSIFICATION_SCHEMA = pa.schema(
    [("id", pa.string()), ("sequence", pa.string()), ("label", pa.int64()), ("split", pa.string())]
)
VARIANT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ref_sequence", pa.string()),
        ("alt_sequence", pa.string()),
        ("variant_offset", pa.int64()),
        ("label", pa.int64()),  # null where a variant has no label
        ("split", pa.string()),
    ]
)
# extension -> (reader, line of the first row): CSV and TSV rows start after the header, one row a line.
TABLE_READERS = {
    ".parquet": (pyarrow.parquet.read_table, None),
    ".csv": (pyarrow.csv.read_csv, 2),
    ".tsv": (functools.partial(pyarrow.csv.read_csv, parse_options=pyarrow.csv.ParseOptions(delimiter="\t")), 2),
    ".jsonl": (pyarrow.json.read_json, 1),
}
WINDOW_TRIES = 100  # per background window wanted, before the background is judged too full of N


# ----------------------------------------------------------------------------- config


class FastaSource(StrictModel):
    """One FASTA per class; every record is an example, its id the record name."""

    type: Literal["fasta"]
    classes: dict[str, str]  # class name -> FASTA URL
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class GenomicBenchmarksSource(StrictModel):
    """A task of the `genomic-benchmarks` package as its download writes it:
    `<root>/<task>/{train,test}/<class>/<id>.txt`, one sequence per file."""

    type: Literal["genomic_benchmarks"]
    root: str
    task: str


class TableSource(StrictModel):
    """Tables with a sequence and a label column: `files` per split (Parquet, CSV, TSV or JSONL, by extension;
    `eval` is the validation split), or `hub`, anything `datasets.load_dataset` takes as a path (a Hugging
    Face dataset name, or a local folder of split files), read with its own splits or, with `files`, those
    files of it. The defaults fit the Nucleotide Transformer downstream tasks; the Genos benchmarks
    (`<Task>/{train,eval,test}.jsonl`) need `sequence_column: seq`, and on the hub their files named:
    `datasets` reads a file called eval as part of the test split."""

    type: Literal["table"]
    files: dict[Literal["train", "validation", "eval", "test"], str] | None = None  # with hub: paths inside it
    hub: str | None = None
    subset: str | None = None
    revision: str | None = None
    sequence_column: str = "sequence"
    label_column: str = "label"
    id_column: str | None = None  # null: `<split>-<row index>`

    @model_validator(mode="after")
    def _one_origin(self) -> TableSource:
        if self.files is None and self.hub is None:
            raise ValueError("give `files` (split: URL) or `hub` (a dataset for datasets.load_dataset)")
        if self.hub is None and (self.subset is not None or self.revision is not None):
            raise ValueError("`subset` and `revision` go with `hub`")
        if self.files is not None:
            if {"validation", "eval"} <= self.files.keys():
                raise ValueError("files: `validation` and `eval` are the same split; give one")
            missing = [split for split in ("train", "test") if split not in self.files]
            if missing:
                raise ValueError(f"files: no {missing[0]} file (a classification task needs train and test)")
        return self


class JasparBackground(StrictModel):
    fasta: str  # windows are cut from this FASTA's records


class JasparSource(StrictModel):
    """Semi-synthetic motif task from a real transcription-factor profile (pyjaspar's JASPAR databases):
    `site` windows hold `sites` sites sampled from the profile's count matrix, `background` windows as many
    dinucleotide-shuffled sampled sites, each at a random place of its own slot of the window (the window cut
    into `sites` equal slots, so sites never overlap) in random orientation.

    How hard the task is depends on the profile: a short one has few dinucleotide-preserving arrangements
    (TBP's TATAAAA has four, one of them itself), so one site per 200 bp is nearly invisible to a k-mer
    spectrum (measured: AUROC 0.57 with a logistic probe; CTCF's 15 bp: 0.79), while 4 CTCF sites give 0.98.
    """

    type: Literal["jaspar"]
    motif: str = Field(pattern=r"^[A-Z]{2,3}\d{4}(\.\d+)?$")  # e.g. MA0108 (latest version) or MA0108.3; TBP
    release: str = "JASPAR2024"
    background: JasparBackground
    length: int = Field(200, ge=1)  # bases per window
    sites: int = Field(1, ge=1)  # sites (or shuffled sites) per window
    per_class: int = Field(500, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    # A cooperative-pair task instead: each site is `motif` then `partner` `spacing` bases further (start to
    # start, one strand), against the very same pairs at one of `control_spacings`. Both classes hold the
    # same k-mers but at the junction, so only a model that sees the spacing tells them apart; 21 bp is two
    # helical turns (both factors on one face of the helix), 16 and 26 bp put them half a turn apart.
    partner: str | None = Field(None, pattern=r"^[A-Z]{2,3}\d{4}(\.\d+)?$")
    spacing: int = Field(21, ge=1)
    control_spacings: list[int] = Field(default_factory=lambda: [16, 26], min_length=1)

    @field_validator("release")
    @classmethod
    def _known_release(cls, release: str) -> str:
        if release not in motifs.releases():
            raise ValueError(f"unknown JASPAR release {release!r}; pyjaspar has {', '.join(motifs.releases())}")
        return release


class VariantsSource(StrictModel):
    """SNVs in a table (Parquet, CSV, TSV or JSONL). With `reference`, rows are contig, position, ref, alt and
    each becomes the `window` around it cut from the reference; without, rows are ref and alt sequences
    of the same length (as the Long-Range Benchmark's causal eQTL task has them) with the variant at
    `variant_offset_column`, or at the centre."""

    type: Literal["variants"]
    table: str
    reference: str | None = None  # FASTA URL
    position_base: Literal[0, 1] = 1  # 1 as in VCF
    window: int = Field(1024, ge=1)
    contig_column: str = "contig"
    position_column: str = "position"
    ref_column: str = "ref"
    alt_column: str = "alt"
    ref_sequence_column: str = "ref_sequence"
    alt_sequence_column: str = "alt_sequence"
    variant_offset_column: str | None = None  # null: the centre, length // 2
    label_column: str | None = "label"  # null: an unlabelled table
    id_column: str | None = None  # null: `row-<row index>`
    split_column: str | None = None  # null: every variant is in the test split

    @model_validator(mode="after")
    def _keys_of_its_form(self) -> VariantsSource:
        positional = {"position_base", "window", "contig_column", "position_column", "ref_column", "alt_column"}
        paired = {"ref_sequence_column", "alt_sequence_column", "variant_offset_column"}
        misplaced = self.model_fields_set & (paired if self.reference else positional)
        if misplaced:
            form = "ref/alt sequence pairs (no `reference`)" if self.reference is None else "contig and position"
            raise ValueError(f"{sorted(misplaced)[0]} does not apply to rows given as {form}")
        return self


TaskSource = Annotated[
    FastaSource | GenomicBenchmarksSource | TableSource | JasparSource | VariantsSource,
    Field(discriminator="type"),
]


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class TaskData:
    name: str
    kind: str  # "classification" | "variant_effect"
    classes: tuple[str, ...]  # label i means classes[i]
    examples: pa.Table  # CLASSIFICATION_SCHEMA or VARIANT_SCHEMA
    semi_synthetic: bool  # jaspar tasks: every results table labels them so
    content_hash: str  # sha256 over classes and every example in order
    # What is known to lie where, for the interpretability tracks: track name -> example id -> its spans
    # [start, end) in the example's sequence (jaspar: the planted site, or its shuffled stand-in).
    tracks: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)


def load_task(task_name: str, kind: str, source: TaskSource, storage: Sequence[StorageRule]) -> TaskData:
    """The task's examples, read and checked; `storage` gives the fsspec options of each URL."""
    wanted = "variant_effect" if isinstance(source, VariantsSource) else "classification"
    if kind != wanted:
        raise ConfigError(f"tasks.{task_name}: a {source.type} source gives {wanted} examples, not {kind}")
    if isinstance(source, FastaSource):
        return _fasta_task(task_name, source, storage)
    if isinstance(source, GenomicBenchmarksSource):
        return _genomic_benchmarks_task(task_name, source, storage)
    if isinstance(source, TableSource):
        return _table_task(task_name, source, storage)
    if isinstance(source, JasparSource):
        return _jaspar_task(task_name, source, storage)
    return _variants_task(task_name, source, storage)


def _task(
    task_name: str,
    kind: str,
    classes: tuple[str, ...],
    columns: dict[str, list],
    origins: list[str],
    semi_synthetic: bool = False,
    tracks: dict[str, dict[str, list[tuple[int, int]]]] | None = None,
) -> TaskData:
    """The checks every task passes, then the table and its hash. `origins[i]` is the file example i came from."""
    where = f"tasks.{task_name}"
    if not columns["id"]:
        raise InputError(where, "has no examples")
    first_origin: dict[str, str] = {}
    for example_id, origin in zip(columns["id"], origins, strict=True):
        if example_id in first_origin:
            where_else = "twice" if first_origin[example_id] == origin else f"in {first_origin[example_id]} too"
            raise InputError(origin, f"the id is {where_else}; ids must be unique within the task", example_id)
        first_origin[example_id] = origin
    if (kind == "classification" or classes) and len(classes) < 2:  # unlabelled variants need no classes
        raise InputError(where, f"has {len(classes)} class(es) {list(classes)}; a task needs two or more")
    if kind == "classification":
        for split in ("train", "test"):
            if split not in columns["split"]:
                raise InputError(where, f"has no {split} examples (a classification task needs train and test)")
    schema = CLASSIFICATION_SCHEMA if kind == "classification" else VARIANT_SCHEMA
    examples = pa.table(columns, schema=schema)
    return TaskData(task_name, kind, classes, examples, semi_synthetic, content_hash(classes, examples), tracks or {})


def content_hash(classes: Sequence[str], examples: pa.Table) -> str:
    digest = hashlib.sha256(json.dumps(list(classes)).encode())
    for row in examples.to_pylist():  # one JSON array per example: self-delimiting, in column order
        digest.update(json.dumps(list(row.values())).encode())
    return digest.hexdigest()


def hash_split(record_id: str, seed: int, test_fraction: float) -> str:
    """train or test from a hash of the id alone: the same on every run and machine, whatever the file order."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _columns(schema: pa.Schema) -> dict[str, list]:
    return {name: [] for name in schema.names}


def _classes_of(labels: list, where: str) -> tuple[tuple[str, ...], list[int | None]]:
    """(classes, label indices): the distinct values in sorted order; None stays None."""
    try:
        values = sorted({label for label in labels if label is not None})
    except TypeError:
        raise InputError(where, "labels are numbers in one file and text in another") from None
    index = {value: i for i, value in enumerate(values)}
    return tuple(str(value) for value in values), [None if label is None else index[label] for label in labels]


def _normalised(text: Any, origin: str, record: str, line: int | None = None) -> str:
    if not isinstance(text, str):
        raise InputError(origin, f"no sequence text (found {text!r})", record, line)
    try:
        sequence = decode(encode(text))
    except InvalidSequenceError as error:
        problem = f"invalid character {error.character!r} at offset {error.offset} of the sequence"
        raise InputError(origin, problem, record, line) from None
    if not sequence:
        raise InputError(origin, "empty sequence", record, line)
    return sequence


# ----------------------------------------------------------------------------- reading files


def _records(url: str, storage_rules: Sequence[StorageRule]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, token ids) of every record of a FASTA, whole, in file order."""
    pieces = read_fasta(Source(url, options_for(url, storage_rules)))
    try:  # read_fasta starts every record with a piece of its own and refuses repeated names
        for name, group in itertools.groupby(pieces, key=operator.itemgetter(0)):
            yield name, np.concatenate([ids for _, ids in group])
    except FileNotFoundError:
        raise InputError(url, "no such file") from None


def _read_table(url: str, storage_rules: Sequence[StorageRule]) -> tuple[pa.Table, int | None]:
    """(table, line of its first row, or None for Parquet)."""
    extension = os.path.splitext(url)[1].lower()
    if extension not in TABLE_READERS:
        raise InputError(url, f"unknown table format {extension!r}: use .parquet, .csv, .tsv or .jsonl")
    read, first_line = TABLE_READERS[extension]
    try:
        with storage.open_url(url, "rb", options_for(url, storage_rules)) as handle:
            return read(handle), first_line
    except FileNotFoundError:
        raise InputError(url, "no such file") from None
    except pa.ArrowInvalid as error:
        raise InputError(url, f"cannot be read as {extension[1:]}: {str(error).splitlines()[0]}") from None


def _column(table: pa.Table, name: str, key: str, origin: str) -> list:
    if name not in table.column_names:
        raise InputError(origin, f"no column {name!r} (the {key}); its columns are {', '.join(table.column_names)}")
    return table[name].to_pylist()


def _labels(table: pa.Table, name: str, key: str, origin: str) -> list:
    values = _column(table, name, key, origin)
    column_type = table[name].type
    if not any(
        check(column_type)
        for check in (
            pa.types.is_integer,
            pa.types.is_boolean,
            pa.types.is_null,
            pa.types.is_string,
            pa.types.is_large_string,
        )
    ):
        raise InputError(origin, f"column {name!r} (the {key}) holds {column_type} values; labels are integers or text")
    return values


def _ids(table: pa.Table, id_column: str | None, default_prefix: str, origin: str) -> list[str]:
    if id_column is None:
        return [f"{default_prefix}-{row}" for row in range(table.num_rows)]
    return [str(value) for value in _column(table, id_column, "id_column", origin)]


# ----------------------------------------------------------------------------- fasta


def _fasta_task(task_name: str, source: FastaSource, storage_rules: Sequence[StorageRule]) -> TaskData:
    classes = tuple(sorted(source.classes))
    columns, origins = _columns(CLASSIFICATION_SCHEMA), []
    for label, class_name in enumerate(classes):
        url = source.classes[class_name]
        for record, ids in _records(url, storage_rules):
            if not ids.size:
                raise InputError(url, "empty sequence", record)
            columns["id"].append(record)
            columns["sequence"].append(decode(ids))
            columns["label"].append(label)
            columns["split"].append(hash_split(record, source.seed, source.test_fraction))
            origins.append(url)
    return _task(task_name, "classification", classes, columns, origins)


# ----------------------------------------------------------------------------- genomic_benchmarks


def _genomic_benchmarks_task(
    task_name: str, source: GenomicBenchmarksSource, storage_rules: Sequence[StorageRule]
) -> TaskData:
    task_url = storage.join(source.root, source.task)
    fs, task_path = storage.filesystem(task_url, options_for(task_url, storage_rules))
    for split in ("train", "test"):
        if not fs.isdir(f"{task_path}/{split}"):
            layout = "<root>/<task>/{train,test}/<class>/*.txt"
            raise InputError(storage.join(task_url, split), f"no such directory (a task is {layout})")
    paths = [path for split in ("train", "test") for path in sorted(fs.glob(f"{task_path}/{split}/*/*.txt"))]
    contents = fs.cat(paths) if paths else {}
    # Sorted, unlike the package's own loader, whose iterdir() order varies between machines.
    classes = tuple(sorted({path.split("/")[-2] for path in paths}))
    columns, origins = _columns(CLASSIFICATION_SCHEMA), []
    for path in paths:
        split, class_name, file_name = path.split("/")[-3:]
        # The package reuses ids between train and test in some tasks (human_enhancers_ensembl,
        # human_ocr_ensembl, ...), so the split is part of the id.
        example_id = f"{split}/{class_name}/{file_name.removesuffix('.txt')}"
        url = fs.unstrip_protocol(path)
        text = contents[path].decode("ascii", "replace").rstrip()
        columns["id"].append(example_id)
        # One line by format: the first bad character, a line break included, is on line 1.
        columns["sequence"].append(_normalised(text, url, example_id, line=1))
        columns["label"].append(classes.index(class_name))
        columns["split"].append(split)
        origins.append(url)
    return _task(task_name, "classification", classes, columns, origins)


# ----------------------------------------------------------------------------- table


def _table_task(task_name: str, source: TableSource, storage_rules: Sequence[StorageRule]) -> TaskData:
    if source.hub is not None:
        splits = _hub_splits(source)
    else:
        splits = {SPLIT_NAMES[key]: (url, *_read_table(url, storage_rules)) for key, url in source.files.items()}
    columns, origins, raw_labels = _columns(CLASSIFICATION_SCHEMA), [], []
    for split in SPLITS:  # in a fixed order, so that the hash does not depend on the order files are listed in
        if split not in splits:
            continue
        origin, table, first_line = splits[split]
        sequences = _column(table, source.sequence_column, "sequence_column", origin)
        labels = _labels(table, source.label_column, "label_column", origin)
        ids = _ids(table, source.id_column, split, origin)
        for row, (example_id, text, label) in enumerate(zip(ids, sequences, labels, strict=True)):
            line = None if first_line is None else first_line + row
            if label is None:
                raise InputError(origin, f"no label in column {source.label_column!r}", example_id, line)
            columns["id"].append(example_id)
            columns["sequence"].append(_normalised(text, origin, example_id, line))
            columns["split"].append(split)
            raw_labels.append(label)
            origins.append(origin)
    classes, columns["label"] = _classes_of(raw_labels, f"tasks.{task_name}")
    return _task(task_name, "classification", classes, columns, origins)


def _hub_splits(source: TableSource) -> dict[str, tuple[str, pa.Table, None]]:
    import datasets  # seconds to import, and only this path needs it

    name = source.hub + (f" ({source.subset})" if source.subset else "")
    data_files = None if source.files is None else {SPLIT_NAMES[key]: path for key, path in source.files.items()}
    try:
        loaded = datasets.load_dataset(source.hub, source.subset, revision=source.revision, data_files=data_files)
    except (FileNotFoundError, ConnectionError) as error:
        raise InputError(name, f"cannot be loaded: {str(error).splitlines()[0]}") from None
    splits = {}
    for split, dataset in loaded.items():
        if split not in SPLIT_NAMES:
            raise InputError(name, f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
        splits[SPLIT_NAMES[split]] = (f"{name} [{split}]", dataset.with_format("arrow")[:], None)
    return splits


# ----------------------------------------------------------------------------- jaspar


def _profile(task_name: str, key: str, motif_id: str, release: str) -> motifs.Profile:
    try:
        return motifs.load_profile(motif_id, release)
    except KeyError as error:
        raise ConfigError(f"tasks.{task_name}.source.{key}: {error.args[0]}") from None


def _jaspar_task(task_name: str, source: JasparSource, storage_rules: Sequence[StorageRule]) -> TaskData:
    profile = _profile(task_name, "motif", source.motif, source.release)
    partner = source.partner and _profile(task_name, "partner", source.partner, source.release)
    site_length = profile.length
    if partner:
        spacings = [source.spacing, *source.control_spacings]
        if min(spacings) < profile.length:
            raise ConfigError(f"tasks.{task_name}.source: a spacing of {min(spacings)} overlaps {profile.matrix_id} "
                              f"({profile.length} bases) with its partner")
        site_length = max(spacings) + partner.length
    slot = source.length // source.sites
    if slot < site_length:
        raise ConfigError(
            f"tasks.{task_name}.source.length: {source.length} bases hold no {source.sites} sites of "
            f"{site_length} bases ({profile.matrix_id}{' with its partner' if partner else ''}) side by side"
        )

    url = source.background.fasta
    rng = np.random.default_rng(source.seed)
    windows = _background_windows(
        [ids for _, ids in _records(url, storage_rules)], source.length, 2 * source.per_class, rng, url
    )
    classes = ("other spacing", f"pair at {source.spacing} bp") if partner else ("background", "site")
    columns, origins, planted = _columns(CLASSIFICATION_SCHEMA), [], {}
    for i in range(source.per_class):
        for label in range(len(classes)):  # as `classes` orders them: controls first, then sites
            example_id = f"{classes[label]}-{i}"
            window, spans = windows[2 * i + label], []
            for j in range(source.sites):
                site = profile.sample(rng.random(profile.length))
                if partner:
                    spacing = source.spacing if label else int(rng.choice(source.control_spacings))
                    filler = window[rng.integers(window.size, size=spacing - profile.length)]  # background bases
                    site = np.concatenate([site, filler, partner.sample(rng.random(partner.length))])
                elif label == 0:
                    site = dinucleotide_shuffle(site, rng)
                window, at = _plant(window, site, rng, slot_start=j * slot, slot_length=slot)
                spans.append((at, at + site.size))
            columns["id"].append(example_id)
            columns["sequence"].append(decode(window))
            columns["label"].append(label)
            columns["split"].append(hash_split(example_id, source.seed, source.test_fraction))
            origins.append(url)
            planted[example_id] = spans
    return _task(task_name, "classification", classes, columns, origins, semi_synthetic=True,
                 tracks={"planted site": planted})


def _background_windows(
    records: list[np.ndarray], length: int, count: int, rng: np.random.Generator, url: str
) -> list[np.ndarray]:
    """`count` windows at uniform random places of the records (each start position equally likely),
    those holding an N drawn again."""
    records = [ids for ids in records if ids.size >= length]
    if not records:
        raise InputError(url, f"no record is {length} bases long (the task's length)")
    starts = np.array([ids.size - length + 1 for ids in records], dtype=np.float64)
    windows: list[np.ndarray] = []
    for _ in range(WINDOW_TRIES * count):
        ids = records[rng.choice(len(records), p=starts / starts.sum())]
        start = rng.integers(ids.size - length + 1)
        window = ids[start : start + length]
        if not (window == N).any():
            windows.append(window)
            if len(windows) == count:
                return windows
    raise InputError(
        url,
        f"only {len(windows)} of {count} windows of {length} bases without N in {WINDOW_TRIES * count} random places",
    )


def _plant(window: np.ndarray, site: np.ndarray, rng: np.random.Generator, slot_start: int,
           slot_length: int) -> tuple[np.ndarray, int]:
    """The window with the site written in at a random place of the slot, in a random orientation; and that place."""
    oriented = reverse_complement(site) if rng.random() < 0.5 else site
    at = slot_start + int(rng.integers(slot_length - site.size + 1))
    planted = window.copy()
    planted[at : at + site.size] = oriented
    return planted, at


def dinucleotide_shuffle(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random sequence with exactly the dinucleotide counts (and first and last letter) of `ids`.

    Altschul & Erickson's Euler-path shuffle (1985): a sequence is a walk through the multigraph whose
    edges are its dinucleotides, and every such walk is fixed by which exit each letter leaves by last
    (those exits form a tree into the final letter) and the order of its other exits. Drawing both at
    random gives every sequence with these counts the same chance, exactly; a shuffle of single letters
    would change the dinucleotide composition (CpG, TpA steps) and let a probe tell the classes apart by
    composition instead of by the motif, and swap-based shuffles are uniform only in the limit.
    """
    letters = ids.tolist()
    if len(letters) < 3:
        return ids.copy()
    first, last = letters[0], letters[-1]
    exits: dict[int, list[int]] = defaultdict(list)
    for a, b in itertools.pairwise(letters):
        exits[a].append(b)
    while True:  # a last exit per letter, drawn again until they lead from every letter to the final one
        last_exit = {letter: int(rng.integers(len(out))) for letter, out in exits.items() if letter != last}
        if all(_reaches(letter, last, exits, last_exit) for letter in last_exit):
            break
    order = {}
    for letter, out in exits.items():
        others = [b for i, b in enumerate(out) if i != last_exit.get(letter)]
        rng.shuffle(others)
        order[letter] = iter(others + ([out[last_exit[letter]]] if letter in last_exit else []))
    walk = [first]
    for _ in range(len(letters) - 1):
        walk.append(next(order[walk[-1]]))
    return np.array(walk, dtype=ids.dtype)


def _reaches(letter: int, target: int, exits: dict[int, list[int]], last_exit: dict[int, int]) -> bool:
    seen = set()
    while letter != target:
        if letter in seen:
            return False
        seen.add(letter)
        letter = exits[letter][last_exit[letter]]
    return True


# ----------------------------------------------------------------------------- variants


def _variants_task(task_name: str, source: VariantsSource, storage_rules: Sequence[StorageRule]) -> TaskData:
    url = source.table
    table, first_line = _read_table(url, storage_rules)
    ids = _ids(table, source.id_column, "row", url)
    lines = [None if first_line is None else first_line + row for row in range(table.num_rows)]
    if source.reference is None:
        windows = _paired_windows(table, source, ids, lines)
    else:
        windows = _reference_windows(table, source, ids, lines, storage_rules)
    if source.label_column is None:
        labels = [None] * table.num_rows
    else:
        labels = _labels(table, source.label_column, "label_column", url)
    splits = ["test"] * table.num_rows
    if source.split_column is not None:
        splits = _column(table, source.split_column, "split_column", url)
        for example_id, line, split in zip(ids, lines, splits, strict=True):
            if split not in SPLIT_NAMES:
                raise InputError(url, f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}", example_id, line)
    classes, label_indices = _classes_of(labels, f"tasks.{task_name}")
    columns = {
        "id": ids,
        "ref_sequence": [ref for ref, _, _ in windows],
        "alt_sequence": [alt for _, alt, _ in windows],
        "variant_offset": [offset for _, _, offset in windows],
        "label": label_indices,
        "split": [SPLIT_NAMES[split] for split in splits],
    }
    return _task(task_name, "variant_effect", classes, columns, [url] * table.num_rows)


def _paired_windows(
    table: pa.Table, source: VariantsSource, ids: list[str], lines: list[int | None]
) -> list[tuple[str, str, int]]:
    url = source.table
    refs = _column(table, source.ref_sequence_column, "ref_sequence_column", url)
    alts = _column(table, source.alt_sequence_column, "alt_sequence_column", url)
    if source.variant_offset_column is None:
        offsets = [None] * table.num_rows
    else:
        offsets = _column(table, source.variant_offset_column, "variant_offset_column", url)
    windows = []
    for example_id, line, ref_text, alt_text, offset in zip(ids, lines, refs, alts, offsets, strict=True):
        ref, alt = _normalised(ref_text, url, example_id, line), _normalised(alt_text, url, example_id, line)
        if len(ref) != len(alt):
            raise InputError(
                url, f"ref ({len(ref)} bases) and alt ({len(alt)}) sequences differ in length", example_id, line
            )
        offset = len(ref) // 2 if source.variant_offset_column is None else offset
        if not isinstance(offset, int) or not 0 <= offset < len(ref):
            raise InputError(
                url, f"variant offset {offset!r} is not inside the {len(ref)}-base sequence", example_id, line
            )
        windows.append((ref, alt, offset))
    return windows


def _reference_windows(
    table: pa.Table,
    source: VariantsSource,
    ids: list[str],
    lines: list[int | None],
    storage_rules: Sequence[StorageRule],
) -> list[tuple[str, str, int]]:
    """The `window` bases around each SNV, cut from the reference: centred, or shifted to lie inside the
    contig when the variant is nearer an end than half a window (`variant_offset` then says where it is),
    so that every window has the same length."""
    url = source.table
    contigs = [str(value) for value in _column(table, source.contig_column, "contig_column", url)]
    positions = _column(table, source.position_column, "position_column", url)
    refs = _column(table, source.ref_column, "ref_column", url)
    alts = _column(table, source.alt_column, "alt_column", url)
    wanted = set(contigs)
    reference = {name: bases for name, bases in _records(source.reference, storage_rules) if name in wanted}
    windows = []
    for example_id, line, contig, position, ref_text, alt_text in zip(
        ids, lines, contigs, positions, refs, alts, strict=True
    ):
        ref, alt = _normalised(ref_text, url, example_id, line), _normalised(alt_text, url, example_id, line)
        if len(ref) != 1 or len(alt) != 1:
            raise InputError(url, f"only SNVs are scored: ref {ref!r}, alt {alt!r}", example_id, line)
        if contig not in reference:
            raise InputError(url, f"contig {contig!r} is not in the reference {source.reference}", example_id, line)
        bases = reference[contig]
        at = position - source.position_base if isinstance(position, int) else -1
        if not 0 <= at < bases.size:
            raise InputError(
                url,
                f"position {position!r} is not on contig {contig!r} ({bases.size} bases, "
                f"position_base {source.position_base})",
                example_id,
                line,
            )
        found = decode(bases[at : at + 1])
        if found != ref:
            raise InputError(
                url, f"ref {ref!r} does not match the reference's {found!r} at {contig}:{position}", example_id, line
            )
        if bases.size < source.window:
            raise InputError(
                url,
                f"contig {contig!r} ({bases.size} bases) is shorter than the window ({source.window})",
                example_id,
                line,
            )
        start = min(max(at - source.window // 2, 0), bases.size - source.window)
        ref_window = decode(bases[start : start + source.window])
        offset = at - start
        windows.append((ref_window, ref_window[:offset] + alt + ref_window[offset + 1 :], offset))
    return windows
