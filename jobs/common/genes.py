"""Features from a GFF3 or GTF annotation (plain, gzip or inside an NCBI package): gene intervals
for the gene-proximity filter (keep a fragment only if it lies within `flank` bp of a gene), and
features of any type for the tracks of the interpretability plots.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import NamedTuple
from urllib.parse import unquote

import numpy as np

from jobs.common.fasta import CorruptInput, InputError, Source

# Feature types that mark a gene in GFF3 (NCBI, Ensembl) and GTF (GENCODE, Ensembl).
GENE_FEATURES = frozenset({b"gene", b"ncRNA_gene", b"pseudogene"})


class GeneIndex:
    """Per contig, sorted disjoint 0-based intervals [lo, hi): genes widened by the flank, merged."""

    def __init__(self, intervals: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.intervals = intervals

    @classmethod
    def from_annotation(cls, source: Source, flank: int) -> GeneIndex:
        spans: dict[str, list[tuple[int, int]]] = {}
        for line_number, fields in _feature_lines(source):
            if fields[2] not in GENE_FEATURES:
                continue
            start, end = _span(fields, source, line_number)
            spans.setdefault(fields[0].decode(errors="replace"), []).append((start - flank, end + flank))
        if not spans:
            raise InputError(source.name, "no gene features (gene, ncRNA_gene, pseudogene) in this annotation")
        return cls({contig: _merge(np.array(pairs, dtype=np.int64)) for contig, pairs in spans.items()})

    def near(self, contig: str, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Which fragments [start, start + length) overlap a widened gene of `contig`."""
        if contig not in self.intervals:
            return np.zeros(len(starts), dtype=bool)
        lo, hi = self.intervals[contig]
        index = np.searchsorted(lo, starts + lengths, side="left") - 1  # last interval starting before the end
        return (index >= 0) & (hi[np.maximum(index, 0)] > starts)


def _merge(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    lo, hi = pairs[:, 0], pairs[:, 1]
    reach = np.maximum.accumulate(hi)
    first = np.ones(len(lo), dtype=bool)
    first[1:] = lo[1:] > reach[:-1]  # starts a new merged interval
    starts = np.flatnonzero(first)
    return lo[starts], np.maximum.reduceat(hi, starts)


class Feature(NamedTuple):
    """One annotation line: 0-based half-open [start, end) on `contig`; strand as written (+, -, . or ?);
    name from the attributes (GFF3 Name or ID, GTF gene_name, gene_id or transcript_id), "" if none."""

    contig: str
    start: int
    end: int
    type: str
    strand: str
    name: str


# Attribute keys that name a feature, in order of preference (GFF3 first, then GTF).
NAME_ATTRIBUTES = ("Name", "ID", "gene_name", "gene_id", "transcript_id")
_GFF3_ATTRIBUTE = re.compile(r"([^=\s]+)=(.*)")
_GTF_ATTRIBUTE = re.compile(r'(\S+)\s+"?(.*?)"?')


def read_features(source: Source, types: Collection[str] | None = None) -> list[Feature]:
    """Every feature of the annotation in file order, or only those whose type (column 3) is in `types`."""
    wanted = None if types is None else {kind.encode() for kind in types}
    features = []
    for line_number, fields in _feature_lines(source):
        if wanted is not None and fields[2] not in wanted:
            continue
        start, end = _span(fields, source, line_number)
        contig, kind, strand, attributes = (fields[i].decode(errors="replace") for i in (0, 2, 6, 8))
        features.append(Feature(contig, start, end, kind, strand, _name(attributes)))
    return features


def _feature_lines(source: Source) -> Iterator[tuple[int, list[bytes]]]:
    """(line number, the nine columns) of every feature line, comments and blank lines skipped."""
    line_number = 0
    try:
        for line_number, line in enumerate(_lines(source.chunks()), start=1):
            if line.startswith(b"##FASTA"):
                break  # GFF3 may end with embedded sequences
            if not line.strip() or line.startswith(b"#"):
                continue
            fields = line.rstrip(b"\r").split(b"\t")
            if len(fields) != 9:
                raise InputError(source.name, "not a GFF3/GTF line: expected 9 tab-separated columns",
                                 line=line_number)
            yield line_number, fields
    except CorruptInput as error:
        raise InputError(source.name, str(error), line=line_number + 1) from None


def _span(fields: list[bytes], source: Source, line_number: int) -> tuple[int, int]:
    """Columns 4 and 5, 1-based inclusive [start, end], as 0-based half-open [start - 1, end)."""
    try:
        return int(fields[3]) - 1, int(fields[4])
    except ValueError:
        raise InputError(source.name, f"{fields[2].decode(errors='replace')} start/end (columns 4 and 5) "
                         "are not integers", line=line_number) from None


def _name(attributes: str) -> str:
    """The feature's name from column 9: GFF3 `key=value;...` (percent-encoded) or GTF `key "value"; ...`."""
    pairs = {}
    for item in attributes.split(";"):
        if gff3 := _GFF3_ATTRIBUTE.fullmatch(item.strip()):
            pairs[gff3[1]] = unquote(gff3[2])
        elif gtf := _GTF_ATTRIBUTE.fullmatch(item.strip()):
            pairs[gtf[1]] = gtf[2]
    return next((pairs[key] for key in NAME_ATTRIBUTES if pairs.get(key)), "")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail
