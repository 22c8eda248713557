"""Gene intervals from a GFF3 or GTF annotation (plain, gzip or inside an NCBI package), for
the gene-proximity filter: keep a fragment only if it lies within `flank` bp of a gene.
"""

from __future__ import annotations

from collections.abc import Iterator

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
                if fields[2] not in GENE_FEATURES:
                    continue
                try:
                    start, end = int(fields[3]), int(fields[4])
                except ValueError:
                    raise InputError(source.name, "gene start/end (columns 4 and 5) are not integers",
                                     line=line_number) from None
                # 1-based inclusive [start, end] -> 0-based half-open, widened by the flank.
                spans.setdefault(fields[0].decode(errors="replace"), []).append((start - 1 - flank, end + flank))
        except CorruptInput as error:
            raise InputError(source.name, str(error), line=line_number + 1) from None
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


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail
