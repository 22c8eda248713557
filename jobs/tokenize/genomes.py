"""Generated primate-like genomes: synthetic sequence for the quickstart, tests and benchmarks.

Not real DNA. Each genome is drawn from a seeded generator with the features a tokeniser
meets in real assemblies: AT-rich background (41% GC), interspersed repeat families copied
with mutations and soft-masked (lower case, ~45% of the sequence as in primates), soft-masked
microsatellites, promoter and splice motifs (TATA box, CpG islands, Kozak, GT..AG), IUPAC
ambiguity codes and runs of N (assembly gaps). Files differ in line width, line ends (LF or
CRLF) and gzip layout (one member or several, like bgzip).

    python -m jobs.tokenize.genomes   # rewrites the quickstart genomes in jobs/assemblies/data/

Draws use numpy's legacy RandomState, whose streams numpy keeps fixed across versions, and
gzip is written with mtime 0, so the same recipe always gives the same bytes.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.common import storage

ALPHABET = np.frombuffer(b"ACGT", dtype=np.uint8)
BACKGROUND = (0.295, 0.205, 0.205, 0.295)  # A C G T: 41% GC
MOTIFS = (b"TATAAAAG", b"GCCGCCACCATGG", b"GTAAGT", b"TTTTTTTTTCAG", b"GGGCGGGGC", b"CACGTG")
DATA_DIR = Path(__file__).resolve().parents[1] / "assemblies" / "data"


@dataclass(frozen=True)
class Recipe:
    name: str
    contigs: tuple[int, ...]  # contig lengths; 0 makes an empty record
    seed: int
    line_width: int = 60
    crlf: bool = False
    gzip_members: int = 1  # >1 writes a multi-member gzip, as bgzip does
    repeat_fraction: float = 0.45
    gap_count: int = 2  # runs of N per contig (assembly gaps)


# The quickstart's generated genomes (the real one is the human mitochondrial reference).
QUICKSTART = (
    Recipe("generated-primate-a", contigs=(120_000, 60_000, 20_000), seed=1),
    Recipe("generated-primate-b", contigs=(90_000, 40_000), seed=2, line_width=70, crlf=True, gzip_members=3),
    Recipe("generated-primate-c", contigs=(50_000, 30_000, 5_000, 0), seed=3, line_width=80),
)


def contigs(recipe: Recipe) -> Iterator[tuple[str, bytes]]:
    """(name, sequence) per contig; soft-masked repeats are lower case."""
    rs = np.random.RandomState(recipe.seed)
    families = [_random_bases(rs, int(length)) for length in rs.randint(150, 3000, size=12)]
    for number, length in enumerate(recipe.contigs, start=1):
        yield f"chr{number}", _contig(rs, length, families, recipe).tobytes()


def _random_bases(rs: np.random.RandomState, length: int) -> np.ndarray:
    return ALPHABET[rs.choice(4, size=length, p=BACKGROUND)]


def _contig(rs: np.random.RandomState, length: int, families: list[np.ndarray], recipe: Recipe) -> np.ndarray:
    sequence = _random_bases(rs, length)
    if length < 1000:
        return sequence
    lower = np.zeros(length, dtype=bool)
    # Interspersed repeats: mutated copies of a few families, soft-masked.
    covered, target = 0, recipe.repeat_fraction * length
    while covered < target:
        family = families[rs.randint(len(families))]
        copy = family[rs.randint(0, len(family) // 3) :].copy()
        mutated = rs.random_sample(len(copy)) < 0.12
        copy[mutated] = ALPHABET[rs.randint(4, size=int(mutated.sum()))]
        start = rs.randint(0, length - len(copy))
        sequence[start : start + len(copy)] = copy
        lower[start : start + len(copy)] = True
        covered += len(copy)
    # Microsatellites, soft-masked.
    for _ in range(length // 5000):
        unit = _random_bases(rs, rs.randint(1, 7))
        run = np.tile(unit, rs.randint(5, 30))[: length // 10]
        start = rs.randint(0, length - len(run))
        sequence[start : start + len(run)] = run
        lower[start : start + len(run)] = True
    # Motifs and CpG islands, upper case.
    for _ in range(length // 2000):
        motif = np.frombuffer(MOTIFS[rs.randint(len(MOTIFS))], dtype=np.uint8)
        start = rs.randint(0, length - len(motif))
        sequence[start : start + len(motif)] = motif
        lower[start : start + len(motif)] = False
    for _ in range(length // 20000):
        island = np.tile(np.frombuffer(b"CG", dtype=np.uint8), rs.randint(50, 300))
        start = rs.randint(0, length - len(island))
        sequence[start : start + len(island)] = island
        lower[start : start + len(island)] = False
    sequence[lower] += 32  # ASCII lower case
    # Ambiguity codes and assembly gaps.
    ambiguous = rs.randint(0, length, size=max(1, length // 50_000))
    sequence[ambiguous] = np.frombuffer(b"RYKMSW", dtype=np.uint8)[rs.randint(6, size=len(ambiguous))]
    for _ in range(recipe.gap_count):
        gap = rs.randint(100, max(101, length // 20))
        start = rs.randint(0, length - gap)
        sequence[start : start + gap] = ord("N")
    return sequence


def fasta_bytes(recipe: Recipe) -> bytes:
    newline = b"\r\n" if recipe.crlf else b"\n"
    width = recipe.line_width
    parts = []
    for name, sequence in contigs(recipe):
        parts.append(f">{name} {recipe.name} (generated, not real sequence)".encode() + newline)
        parts.extend(sequence[i : i + width] + newline for i in range(0, len(sequence), width))
    return b"".join(parts)


def gzip_bytes(data: bytes, members: int = 1, level: int = 6) -> bytes:
    """gzip with mtime 0 (reproducible); several members when asked, split at equal sizes."""
    step = -(-len(data) // members)
    return b"".join(gzip.compress(data[i : i + step], compresslevel=level, mtime=0)
                    for i in range(0, len(data), step))


def write(recipe: Recipe, directory: Path) -> Path:
    path = directory / f"{recipe.name}.fa.gz"
    storage.write_bytes(str(path), gzip_bytes(fasta_bytes(recipe), recipe.gzip_members))  # whole or not at all
    return path


def main() -> None:
    for recipe in QUICKSTART:
        path = write(recipe, DATA_DIR)
        print(f"{path} ({path.stat().st_size:,} bytes, {sum(recipe.contigs):,} bp)")


if __name__ == "__main__":
    main()
