"""Generated genomes: synthetic sequence with documented structure, for the quickstart, the experiment's
positive and negative controls, tests and benchmarks.

Not real DNA: every FASTA header, assembly list and table calls it generated. A genome is a background
with elements planted into it, and every planted element is recorded in a GFF3 beside the FASTA. The
structure (`Structure`) is fixed from biology before any comparison runs; its defaults, and what they
stand for in the human genome:

- background: a variable-order Markov chain (order <= 5) fitted to both strands of a real sequence (the
  rCRS the repository ships, or any FASTA named): the k-mer composition of real DNA, worth only ~0.01
  nats over base frequencies (FIELD-NOTES).
- a SINE family: a 280 bp consensus with an A-rich tail; copies 2-15 % diverged, 10 % of the sequence,
  soft-masked. Human Alu: ~300 bp, 10.6 %, subfamilies AluY to AluJ 2-15 % from their consensus
  (the youngest, AluY, 1-5 %).
- a LINE family: a 6 kb consensus; copies 5'-truncated (mean 900 bp), 3-20 % diverged, 5 %, soft-masked.
  Human L1: 6 kb, 17 %, most copies ~1 kb of its 3' end.
- microsatellites: units of 1-6 bp repeated to 15-60 bp, 3 % mutated, 3 % of the sequence, soft-masked
  (about as in human).
- regulatory modules: 0.3 per kb, 200 bp each, holding 3-6 sites sampled from real JASPAR profiles in
  random orientation. ENCODE's candidate cis-regulatory elements: ~0.9 M in 3.1 Gbp, 150-350 bp each.
- cooperative pairs: half the modules also hold a pair of partner factors 21 bp apart start to start,
  on one strand: two helical turns, so both face the same side of the helix (cooperating factors prefer
  spacings at the ~10.5 bp helical period). A dependency a 21 bp window sees whole.
- gaps and ambiguity: 2 runs of N per contig (100 bp to 5 % of it), 20 IUPAC codes per Mbp.

Repeat families and motif choices are drawn from `family_seed`, shared by every genome of a set as
related primates share their Alus; the rest from each recipe's own seed. `IID` (uniform i.i.d. bases,
nothing planted) is the negative control: nothing in it is learnable beyond ln 4.

    python -m jobs.tokenize.genomes   # rewrites the quickstart genomes in jobs/assemblies/data/

Draws use numpy's legacy RandomState, whose streams numpy keeps fixed across versions, and gzip is
written with mtime 0, so the same recipe always gives the same bytes.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator

from jobs.common import storage
from jobs.common.config import StrictModel
from jobs.common.fasta import Source, read_fasta
from jobs.common.motifs import RELEASE, Profile, load_profile
from model.vocab import DECODE_TABLE

ALPHABET = np.frombuffer(b"ACGT", dtype=np.uint8)  # base digit 0..3 -> ASCII
COMPLEMENT_ASCII = bytes.maketrans(b"ACGTacgt", b"TGCAtgca")
DATA_DIR = Path(__file__).resolve().parents[1] / "assemblies" / "data"
RCRS = DATA_DIR / "rCRS.fasta"
# A Markov context seen fewer times than this in the source falls back to its longest suffix seen
# this often: what makes the chain variable-order (16.5 kb of rCRS fills few order-5 contexts well).
MIN_CONTEXT_COUNT = 32
# Background is drawn as this many bases per chain, all chains stepped together: a Python loop over
# positions alone would take seconds per Mbp. Each chain starts after a burn-in from a random context.
CHAIN_LENGTH = 4096
BURN_IN = 16
PLACEMENT_TRIES = 50  # random places tried for an element before the contig is judged full


class Pair(StrictModel):
    """Two partner factors at a fixed start-to-start spacing, on one strand."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    first: str  # JASPAR matrix ids
    second: str
    spacing: int = Field(21, ge=1)


class Structure(StrictModel):
    """What a generated genome holds; the module docstring says where each number comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    background: Literal["markov", "uniform"] = "markov"
    markov_order: int = Field(5, ge=0, le=8)
    markov_source: str | None = None  # a FASTA URL; None: the rCRS in jobs/assemblies/data
    family_seed: int = 0
    sine_fraction: float = Field(0.10, ge=0, lt=1)
    sine_divergence: tuple[float, float] = (0.02, 0.15)  # of a copy from its consensus, drawn uniformly
    line_fraction: float = Field(0.05, ge=0, lt=1)
    microsatellite_fraction: float = Field(0.03, ge=0, lt=1)
    modules_per_kb: float = Field(0.3, ge=0)
    module_length: int = Field(200, ge=1)
    module_sites: tuple[int, int] = (3, 6)
    motifs: tuple[str, ...] = (
        "MA0139",  # CTCF
        "MA0108",  # TBP (TATA box)
        "MA0079",  # SP1 (GC box)
        "MA0060",  # NFYA (CCAAT box)
        "MA0095",  # YY1
        "MA0138",  # REST
        "MA0148",  # FOXA1
        "MA0114",  # HNF4A
    )
    pairs: tuple[Pair, ...] = (
        Pair(first="MA0079", second="MA0060"),  # SP1 and NF-Y, which cooperate at promoters
        Pair(first="MA0148", second="MA0114"),  # FOXA1 and HNF4A, at liver enhancers
    )
    pair_fraction: float = Field(0.5, ge=0, le=1)  # of modules
    jaspar_release: str = RELEASE
    gaps_per_contig: int = Field(2, ge=0)
    ambiguity_per_mbp: float = Field(20, ge=0)

    @model_validator(mode="after")
    def _fits(self) -> Structure:
        low, high = self.module_sites
        if not 0 <= low <= high:
            raise ValueError(f"module_sites: {self.module_sites} is not a range low <= high")
        low, high = self.sine_divergence
        if not 0 <= low <= high <= 1:
            raise ValueError(f"sine_divergence: {self.sine_divergence} is not a range 0 <= low <= high <= 1")
        if self.sine_fraction + self.line_fraction + self.microsatellite_fraction > 0.6:
            raise ValueError("sine_fraction + line_fraction + microsatellite_fraction: more than 0.6 of a genome")
        return self

    def profiles(self) -> dict[str, Profile]:
        """Every profile the structure names, by the id it names it by; KeyError names one not in the release."""
        ids = {*self.motifs, *(m for pair in self.pairs for m in (pair.first, pair.second))}
        return {motif_id: load_profile(motif_id, self.jaspar_release) for motif_id in sorted(ids)}


# The negative control: uniform i.i.d. bases, nothing planted.
IID = Structure(background="uniform", sine_fraction=0, line_fraction=0, microsatellite_fraction=0,
                modules_per_kb=0, gaps_per_contig=0, ambiguity_per_mbp=0)


class Recipe(StrictModel):
    """One generated genome: its structure, its contigs, and how its FASTA is laid out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    contigs: tuple[int, ...]  # contig lengths; 0 makes an empty record
    seed: int
    structure: Structure = Structure()
    line_width: int = 60
    crlf: bool = False
    gzip_members: int = 1  # >1 writes a multi-member gzip, as bgzip does

    @field_validator("structure", mode="before")
    @classmethod
    def _named(cls, value):
        return named_structure(value)


# The quickstart's generated genomes (the real one is the human mitochondrial reference): Alu-rich as
# human chromosome 19 is (~26 % Alu against 10.6 % genome-wide), and the family young as AluY is (copies
# 1-5 % from their consensus), so that the debug flavour learns more than base composition within the
# quickstart's few minutes. Measured on the debug flavour at 125 steps: 0.06 nats below the val split's
# unigram entropy; with the default family at 25 %, 0.028 at 100 steps and 0.044 at 200.
QUICKSTART_STRUCTURE = Structure(sine_fraction=0.30, sine_divergence=(0.01, 0.05))
# What a config may name instead of spelling a structure out (`structure: iid`).
NAMED_STRUCTURES = {"iid": IID, "quickstart": QUICKSTART_STRUCTURE}


def named_structure(value):
    """A structure a config names, as its Structure; anything else as it is (for pydantic to validate)."""
    if not isinstance(value, str):
        return value
    if value not in NAMED_STRUCTURES:
        raise ValueError(f"structure: no structure is named {value!r}; name one of {sorted(NAMED_STRUCTURES)} "
                         "or give its fields")
    return NAMED_STRUCTURES[value]


QUICKSTART = (
    Recipe(name="generated-primate-a", contigs=(120_000, 60_000, 20_000), seed=1, structure=QUICKSTART_STRUCTURE),
    Recipe(name="generated-primate-b", contigs=(90_000, 40_000), seed=2, structure=QUICKSTART_STRUCTURE,
           line_width=70, crlf=True, gzip_members=3),
    Recipe(name="generated-primate-c", contigs=(50_000, 30_000, 5_000, 0), seed=3, structure=QUICKSTART_STRUCTURE,
           line_width=80),
)


# ----------------------------------------------------------------------------- background


class MarkovBackground:
    """P(next base | up to `order` previous bases), fitted to both strands of a FASTA.

    A context is an index in base 4 with the most recent base as its lowest digit, so its suffix of
    length j (the j most recent bases) is `context % 4**j`.
    """

    def __init__(self, next_base: np.ndarray, order: int):
        self.order, self.cdf = order, np.cumsum(next_base, axis=1)[:, :3]

    @classmethod
    def fit(cls, sequences: list[np.ndarray], order: int) -> MarkovBackground:
        counts = [np.zeros((4**j, 4)) for j in range(order + 1)]
        for digits in sequences:
            for strand in (digits, np.where(digits > 3, 4, 3 - digits)[::-1]):  # and its reverse complement
                for j in range(order + 1):
                    counts[j] += _transition_counts(strand, j)
        next_base = np.broadcast_to(_normalised(counts[0][0]), (4**order, 4)).copy()
        contexts = np.arange(4**order)
        for j in range(1, order + 1):
            suffix = contexts % 4**j
            seen = counts[j].sum(axis=1)[suffix] >= MIN_CONTEXT_COUNT
            next_base[seen] = _normalised(counts[j][suffix[seen]])
        return cls(next_base, order)

    def sample(self, length: int, rs: np.random.RandomState) -> np.ndarray:
        chains = max(1, -(-length // CHAIN_LENGTH))
        steps = -(-length // chains) + BURN_IN
        uniforms = rs.random_sample((steps, chains))
        context = rs.randint(4**self.order, size=chains)
        drawn = np.empty((steps, chains), dtype=np.uint8)
        for step in range(steps):
            base = (uniforms[step][:, None] >= self.cdf[context]).sum(axis=1)
            drawn[step] = base
            context = (context * 4 + base) % 4**self.order
        return ALPHABET[drawn[BURN_IN:].T.reshape(-1)[:length]]


def _transition_counts(digits: np.ndarray, order: int) -> np.ndarray:
    """(4**order, 4) counts of each context followed by each base, over windows of valid digits only."""
    n = digits.size - order
    if n <= 0:
        return np.zeros((4**order, 4))
    invalid = np.concatenate([[0], np.cumsum(digits > 3)])
    valid = invalid[order + 1 :] - invalid[: n] == 0
    context = np.zeros(n, dtype=np.int64)
    for back in range(1, order + 1):  # the base `back` positions before the next one is digit back-1
        context += digits[order - back : order - back + n] * 4 ** (back - 1)
    joint = context[valid] * 4 + digits[order:][valid]
    return np.bincount(joint, minlength=4 ** (order + 1)).reshape(4**order, 4).astype(np.float64)


def _normalised(counts: np.ndarray) -> np.ndarray:
    counts = counts + 0.5  # a base never seen after a context stays possible
    return counts / counts.sum(axis=-1, keepdims=True)


@functools.cache
def markov_background(source: str | None, order: int) -> MarkovBackground:
    url = str(RCRS) if source is None else source
    # Token ids A C G T N are 1..5: digits 0..3, and 4 for N, which no counted window holds.
    return MarkovBackground.fit([ids.astype(np.int64) - 1 for _, ids in read_fasta(Source(url))], order)


def background(structure: Structure, length: int, rs: np.random.RandomState) -> np.ndarray:
    if structure.background == "uniform":
        return ALPHABET[rs.randint(4, size=length)]
    return markov_background(structure.markov_source, structure.markov_order).sample(length, rs)


# ----------------------------------------------------------------------------- planted elements


class Families:
    """What every genome of a set shares: the repeat consensi, and the profiles its modules draw from."""

    def __init__(self, structure: Structure):
        rs = np.random.RandomState(structure.family_seed)
        tail = np.frombuffer(b"A" * 24, dtype=np.uint8)
        self.sine = np.concatenate([background(structure, 280, rs), tail])
        self.line = background(structure, 6000, rs)
        self.profiles = structure.profiles()
        for pair in structure.pairs:
            if pair.spacing < self.profiles[pair.first].length:
                raise ValueError(f"pairs: {pair.first} is {self.profiles[pair.first].length} bases long, "
                                 f"more than its spacing {pair.spacing} to {pair.second}")


def _mutated(copy: np.ndarray, rate: float, rs: np.random.RandomState) -> np.ndarray:
    copy = copy.copy()
    hit = rs.random_sample(copy.size) < rate
    copy[hit] = ALPHABET[rs.randint(4, size=int(hit.sum()))]
    return copy


def _reverse_complement(ascii_bases: np.ndarray) -> np.ndarray:
    return np.frombuffer(ascii_bases[::-1].tobytes().translate(COMPLEMENT_ASCII), dtype=np.uint8)


class Contig:
    """One contig being built: its bases, which of them are taken, and the GFF3 rows of what was planted."""

    def __init__(self, name: str, bases: np.ndarray):
        self.name, self.bases = name, bases
        self.taken = np.zeros(bases.size, dtype=bool)
        self.lower = np.zeros(bases.size, dtype=bool)
        self.features: list[str] = []

    def free_place(self, length: int, rs: np.random.RandomState, lo: int = 0, hi: int | None = None) -> int | None:
        hi = self.bases.size if hi is None else hi
        if hi - lo < length:
            return None
        for _ in range(PLACEMENT_TRIES):
            start = lo + rs.randint(hi - lo - length + 1)
            if not self.taken[start : start + length].any():
                return start
        return None

    def put(self, start: int, bases: np.ndarray, *, lower: bool = False, reserve: bool = True) -> None:
        self.bases[start : start + bases.size] = bases
        self.lower[start : start + bases.size] = lower
        if reserve:
            self.taken[start : start + bases.size] = True

    def record(self, kind: str, start: int, length: int, strand: str, **attributes: str) -> None:
        fields = ";".join(f"{key}={value}" for key, value in attributes.items())
        self.features.append(f"{self.name}\tgenerated\t{kind}\t{start + 1}\t{start + length}\t.\t{strand}\t.\t{fields}")


def _plant_repeats(contig: Contig, consensus: np.ndarray, family: str, kind: str, fraction: float,
                   divergence: tuple[float, float], rs: np.random.RandomState, mean_length: int | None = None) -> None:
    covered, target, copies = 0, fraction * contig.bases.size, 0
    while covered < target:
        piece = consensus
        if mean_length is not None:  # 5'-truncated, as most LINE copies are
            piece = consensus[-min(consensus.size, 50 + int(rs.exponential(mean_length - 50))) :]
        rate = rs.uniform(*divergence)
        copy, strand = _mutated(piece, rate, rs), "+-"[rs.randint(2)]
        start = contig.free_place(copy.size, rs)
        if start is None:
            return
        contig.put(start, copy if strand == "+" else _reverse_complement(copy), lower=True)
        copies += 1
        contig.record(kind, start, copy.size, strand, ID=f"{contig.name}.{family}.{copies}", family=family,
                      divergence=f"{rate:.3f}")
        covered += copy.size


def _plant_microsatellites(contig: Contig, fraction: float, rs: np.random.RandomState) -> None:
    covered, target, number = 0, fraction * contig.bases.size, 0
    while covered < target:
        unit = ALPHABET[rs.randint(4, size=rs.randint(1, 7))]
        run = _mutated(np.tile(unit, 60)[: rs.randint(15, 61)], 0.03, rs)
        start = contig.free_place(run.size, rs)
        if start is None:
            return
        contig.put(start, run, lower=True)
        number += 1
        contig.record("microsatellite", start, run.size, "+", ID=f"{contig.name}.microsatellite.{number}",
                      unit=unit.tobytes().decode())
        covered += run.size


class _Sites:
    """Sites of one module, drawn from the shared profiles."""

    def __init__(self, contig: Contig, families: Families, module: str, rs: np.random.RandomState):
        self.contig, self.families, self.module, self.rs, self.count = contig, families, module, rs, 0

    def draw(self, motif_id: str, strand: str) -> tuple[Profile, np.ndarray]:
        profile = self.families.profiles[motif_id]
        site = DECODE_TABLE[profile.sample(self.rs.random_sample(profile.length))]
        return profile, site if strand == "+" else _reverse_complement(site)

    def put(self, profile: Profile, site: np.ndarray, start: int, strand: str, **extra: str) -> None:
        self.contig.put(start, site)
        self.count += 1
        sequence = site if strand == "+" else _reverse_complement(site)
        self.contig.record("TF_binding_site", start, site.size, strand, ID=f"{self.module}.site.{self.count}",
                           Parent=self.module, Name=profile.name, motif=profile.matrix_id,
                           sequence=sequence.tobytes().decode(), **extra)


def _plant_modules(contig: Contig, structure: Structure, families: Families, rs: np.random.RandomState) -> None:
    length = structure.module_length
    for number in range(1, round(structure.modules_per_kb * contig.bases.size / 1000) + 1):
        start = contig.free_place(length, rs)
        if start is None:
            return
        module = f"{contig.name}.module.{number}"
        contig.record("CRM", start, length, ".", ID=module)
        sites = _Sites(contig, families, module, rs)
        if structure.pairs and rs.random_sample() < structure.pair_fraction:
            _plant_pair(sites, structure.pairs[rs.randint(len(structure.pairs))], start, start + length)
        for _ in range(rs.randint(structure.module_sites[0], structure.module_sites[1] + 1)):
            strand = "+-"[rs.randint(2)]
            profile, site = sites.draw(structure.motifs[rs.randint(len(structure.motifs))], strand)
            at = contig.free_place(site.size, rs, start, start + length)
            if at is not None:
                sites.put(profile, site, at, strand)
        contig.taken[start : start + length] = True  # the module's background is its own too


def _plant_pair(sites: _Sites, pair: Pair, lo: int, hi: int) -> None:
    """`first` then `second` `spacing` bases further on their strand: on the minus strand, `second` lies
    to the left in contig coordinates."""
    strand = "+-"[sites.rs.randint(2)]
    (first, first_site), (second, second_site) = sites.draw(pair.first, strand), sites.draw(pair.second, strand)
    span = max(pair.spacing + second.length, first.length)
    at = sites.contig.free_place(span, sites.rs, lo, hi)
    if at is None:
        return
    first_at, second_at = (at, at + pair.spacing) if strand == "+" else (at + span - first.length,
                                                                          at + span - pair.spacing - second.length)
    name = f"{sites.module}.pair"
    sites.put(first, first_site, first_at, strand, pair=name)
    sites.put(second, second_site, second_at, strand, pair=name)


def _plant_gaps(contig: Contig, count: int, rs: np.random.RandomState) -> None:
    length = contig.bases.size
    for number in range(1, count + 1):
        gap = rs.randint(100, max(101, length // 20))
        start = contig.free_place(gap, rs)
        if start is not None:
            contig.put(start, np.full(gap, ord("N"), dtype=np.uint8))
            contig.record("gap", start, gap, ".", ID=f"{contig.name}.gap.{number}")


def _contig(name: str, length: int, structure: Structure, families: Families, rs: np.random.RandomState) -> Contig:
    contig = Contig(name, background(structure, length, rs))
    if length < 1000:
        return contig
    _plant_gaps(contig, structure.gaps_per_contig, rs)
    _plant_repeats(contig, families.line, "LINE-1", "LINE_element", structure.line_fraction, (0.03, 0.20), rs,
                   mean_length=900)
    _plant_repeats(contig, families.sine, "SINE-1", "SINE_element", structure.sine_fraction,
                   structure.sine_divergence, rs)
    _plant_modules(contig, structure, families, rs)
    _plant_microsatellites(contig, structure.microsatellite_fraction, rs)
    # Ambiguity codes in the background only, not recorded: unresolved bases, not elements.
    free, count = np.flatnonzero(~contig.taken), int(structure.ambiguity_per_mbp * length / 1e6)
    if free.size and count:
        ambiguous = free[rs.randint(free.size, size=count)]
        contig.bases[ambiguous] = np.frombuffer(b"RYKMSW", dtype=np.uint8)[rs.randint(6, size=count)]
    contig.bases[contig.lower] += 32  # ASCII lower case: soft-masked, as RepeatMasker leaves repeats
    return contig


def contigs(recipe: Recipe) -> Iterator[Contig]:
    rs = np.random.RandomState(recipe.seed)
    families = Families(recipe.structure)
    for number, length in enumerate(recipe.contigs, start=1):
        yield _contig(f"chr{number}", length, recipe.structure, families, rs)


# ----------------------------------------------------------------------------- files


def files(recipe: Recipe) -> tuple[bytes, bytes]:
    """The FASTA and the GFF3 of what was planted, both as text."""
    newline = b"\r\n" if recipe.crlf else b"\n"
    width = recipe.line_width
    fasta, gff = [], ["##gff-version 3"]
    for contig in contigs(recipe):
        sequence = contig.bases.tobytes()
        fasta.append(f">{contig.name} {recipe.name} (generated, not real sequence)".encode() + newline)
        fasta.extend(sequence[i : i + width] + newline for i in range(0, len(sequence), width))
        gff.append(f"##sequence-region {contig.name} 1 {len(sequence)}")
        gff.extend(sorted(contig.features, key=lambda row: int(row.split("\t")[3])))
    return b"".join(fasta), ("\n".join(gff) + "\n").encode()


def fasta_bytes(recipe: Recipe) -> bytes:
    return files(recipe)[0]


def gzip_bytes(data: bytes, members: int = 1, level: int = 6) -> bytes:
    """gzip with mtime 0 (reproducible); several members when asked, split at equal sizes."""
    step = -(-len(data) // members)
    return b"".join(gzip.compress(data[i : i + step], compresslevel=level, mtime=0)
                    for i in range(0, len(data), step))


def write_genome(recipe: Recipe, directory: str | Path) -> Path:
    """`<name>.fa.gz` and `<name>.gff3.gz` in `directory` (local or any fsspec URL), each whole or not at all."""
    fasta, gff = files(recipe)
    storage.write_bytes(storage.join(str(directory), f"{recipe.name}.gff3.gz"), gzip_bytes(gff))
    path = storage.join(str(directory), f"{recipe.name}.fa.gz")
    storage.write_bytes(path, gzip_bytes(fasta, recipe.gzip_members))
    return Path(path) if storage.protocol(path) == "file" else path


def main() -> None:
    for recipe in QUICKSTART:
        path = write_genome(recipe, DATA_DIR)
        print(f"{path} ({path.stat().st_size:,} bytes, {sum(recipe.contigs):,} bp)")


if __name__ == "__main__":
    main()
