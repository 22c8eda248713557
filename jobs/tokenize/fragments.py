"""From token ids to fragments, with numpy on whole arrays: seq_len windows per contig, the
A/C/G/T and gene-proximity filters, strands, the train/val split and group balancing.

Every per-fragment choice (split, strand, selection) comes from a seeded 64-bit hash of
(assembly, contig, start), never from a random stream, so it does not depend on the order in
which inputs are processed or on how they are spread over workers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from jobs.common.config import ConfigError
from jobs.common.genes import GeneIndex
from model.vocab import COMPLEMENT, PAD, N

# Balancing keeps, per group, the fragments whose selection key falls in the lowest buckets
# of 2**16 (by the key's top 16 bits); see `selection_limits`.
BUCKET_BITS = 16
BUCKETS = 1 << BUCKET_BITS
KEEP_ALL = BUCKETS
DROP_REASONS = ("partial", "acgt", "gene_flank", "balance")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class FragmentSpec:
    seq_len: int
    pad_final: bool
    min_acgt_fraction: float
    gene_flank: int | None
    strand: str  # forward | random | both
    reverse_prob: float
    val_fraction: float
    seed: int

    @property
    def strands_per_window(self) -> int:
        return 2 if self.strand == "both" else 1


@dataclass
class InputStats:
    """What happened to one input; fragment counts include both strands in `both` mode."""

    contigs: int = 0
    empty_records: int = 0
    bases: int = 0
    windows: int = 0
    padded: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)  # split -> bases kept
    size_bytes: int | None = None  # of the input file as stored

    def to_json(self) -> str:
        return json.dumps({**vars(self), "dropped": dict(self.dropped), "tokens": dict(self.tokens)})

    @classmethod
    def from_json(cls, text: str) -> InputStats:
        data = json.loads(text)
        return cls(**{**data, "dropped": Counter(data["dropped"]), "tokens": Counter(data["tokens"])})


@dataclass
class Windows:
    """Consecutive seq_len windows of one contig; `lengths` < seq_len only for a padded final window."""

    contig: str
    starts: np.ndarray  # int64
    tokens: np.ndarray  # (n, seq_len) uint8
    lengths: np.ndarray  # int64


@dataclass
class Fragments:
    """Kept fragments of one contig, in order (start, then + before -)."""

    contig: str
    starts: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    reverse: np.ndarray  # bool
    val: np.ndarray  # bool


class Windower:
    """Cuts each contig into seq_len windows from its start; windows never span contigs."""

    def __init__(self, spec: FragmentSpec, stats: InputStats):
        self.spec, self.stats = spec, stats
        self.contig: str | None = None
        self.carry = np.empty(0, dtype=np.uint8)
        self.offset = 0  # contig position of carry[0]

    def feed(self, contig: str, ids: np.ndarray) -> Iterator[Windows]:
        if contig != self.contig:
            yield from self.finish()
            self.contig, self.offset, self.stats.contigs = contig, 0, self.stats.contigs + 1
        if not ids.size:
            return
        self.stats.bases += ids.size
        length = self.spec.seq_len
        if self.carry.size:  # complete the window begun in the previous piece
            needed = length - self.carry.size
            if ids.size < needed:
                self.carry = np.concatenate([self.carry, ids])
                return
            window = np.concatenate([self.carry, ids[:needed]])
            yield Windows(contig, np.array([self.offset]), window.reshape(1, length), np.array([length]))
            self.offset, ids = self.offset + length, ids[needed:]
        count = ids.size // length
        if count:  # a view of the parsed text, no copy
            starts = self.offset + np.arange(count, dtype=np.int64) * length
            yield Windows(contig, starts, ids[: count * length].reshape(count, length),
                          np.full(count, length, dtype=np.int64))
        self.carry = ids[count * length :].copy()  # a copy: do not pin the whole block
        self.offset += count * length

    def finish(self) -> Iterator[Windows]:
        """Close the current contig: its final partial window is padded or dropped."""
        if self.contig is None:
            return
        if self.offset == 0 and not self.carry.size:
            self.stats.empty_records += 1
        elif self.carry.size and self.spec.pad_final:
            tokens = np.full((1, self.spec.seq_len), PAD, dtype=np.uint8)
            tokens[0, : self.carry.size] = self.carry
            self.stats.padded += 1
            yield Windows(self.contig, np.array([self.offset]), tokens, np.array([self.carry.size]))
        elif self.carry.size:
            self.stats.windows += 1
            self.stats.dropped["partial"] += self.spec.strands_per_window
        self.contig, self.carry = None, self.carry[:0]


def window_keys(seed: int, purpose: str, assembly: str, contig: str, starts: np.ndarray) -> np.ndarray:
    """Seeded 64-bit hashes of (assembly, contig, start): blake2b of the names, splitmix64 of the start."""
    digest = hashlib.blake2b(f"{seed}\0{purpose}\0{assembly}\0{contig}".encode(), digest_size=8).digest()
    x = np.uint64(int.from_bytes(digest, "little")) ^ (starts.astype(np.uint64) * _GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def below(keys: np.ndarray, fraction: float) -> np.ndarray:
    """keys / 2**64 < fraction, exactly at the ends (0 keeps none, 1 keeps all)."""
    if fraction <= 0:
        return np.zeros(keys.shape, dtype=bool)
    if fraction >= 1:
        return np.ones(keys.shape, dtype=bool)
    return keys < np.uint64(int(fraction * 2.0**64))


class FragmentFilter:
    """The per-window decisions of one input: filters, balancing, split and strand."""

    def __init__(self, spec: FragmentSpec, assembly: str, genes: GeneIndex | None, stats: InputStats):
        self.spec, self.assembly, self.genes, self.stats = spec, assembly, genes, stats
        self.annotated_contigs: set[str] = set()  # contigs the annotation has genes on

    def keep(self, windows: Windows) -> np.ndarray:
        """Windows that pass the A/C/G/T and gene-proximity filters (drops counted by reason)."""
        spec, stats = self.spec, self.stats
        stats.windows += len(windows.starts)
        keep = np.ones(len(windows.starts), dtype=bool)
        if spec.min_acgt_fraction > 0:
            # N is the only id above T in parsed sequence: count Ns only in windows that have one.
            suspect = np.flatnonzero(windows.tokens.max(axis=1) >= N)
            not_acgt = np.count_nonzero(windows.tokens[suspect] == N, axis=1)
            lengths = windows.lengths[suspect]
            failed = suspect[(lengths - not_acgt) < spec.min_acgt_fraction * lengths]
            keep[failed] = False
            stats.dropped["acgt"] += len(failed) * spec.strands_per_window
        if self.genes is not None:
            if windows.contig in self.genes.intervals:
                self.annotated_contigs.add(windows.contig)
            near = self.genes.near(windows.contig, windows.starts, windows.lengths)
            stats.dropped["gene_flank"] += int(np.count_nonzero(keep & ~near)) * spec.strands_per_window
            keep &= near
        return keep

    def selection_keys(self, windows: Windows) -> np.ndarray:
        return window_keys(self.spec.seed, "select", self.assembly, windows.contig, windows.starts)

    def fragments(self, windows: Windows, limit: int = KEEP_ALL) -> Fragments | None:
        """Kept fragments of a batch of windows; `limit` is the group's balancing bucket limit."""
        spec, stats = self.spec, self.stats
        keep = self.keep(windows)
        if limit < KEEP_ALL:
            selected = (self.selection_keys(windows) >> np.uint64(64 - BUCKET_BITS)) < np.uint64(limit)
            stats.dropped["balance"] += int(np.count_nonzero(keep & ~selected)) * spec.strands_per_window
            keep &= selected
        if not keep.any():
            return None
        if keep.all():
            starts, tokens, lengths = windows.starts, windows.tokens, windows.lengths
        else:
            starts, tokens, lengths = windows.starts[keep], windows.tokens[keep], windows.lengths[keep]
        val = below(window_keys(spec.seed, "split", self.assembly, windows.contig, starts), spec.val_fraction)
        if spec.strand == "both":
            starts, lengths, val = (np.repeat(a, 2) for a in (starts, lengths, val))
            tokens = np.repeat(tokens, 2, axis=0)
            reverse = np.tile(np.array([False, True]), len(starts) // 2)
        elif spec.strand == "random":
            strand_keys = window_keys(spec.seed, "strand", self.assembly, windows.contig, starts)
            reverse = below(strand_keys, spec.reverse_prob)
        else:
            reverse = np.zeros(len(starts), dtype=bool)
        if reverse.any():
            if not tokens.flags.owndata:  # a view of the parsed text: copy before writing
                tokens = tokens.copy()
            tokens[reverse] = reverse_complement(tokens[reverse], lengths[reverse])
        stats.kept += len(starts)
        stats.tokens["val"] += int(lengths[val].sum())
        stats.tokens["train"] += int(lengths[~val].sum())
        return Fragments(windows.contig, starts, tokens, lengths, reverse, val)


def reverse_complement(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row-wise reverse complement of the first `length` tokens; padding stays at the end."""
    out = COMPLEMENT[tokens[:, ::-1]]
    for row in np.flatnonzero(lengths < tokens.shape[1]):  # padded final windows: at most one per contig
        out[row] = PAD
        out[row, : lengths[row]] = COMPLEMENT[tokens[row, : lengths[row]][::-1]]
    return out


def bucket_histogram(keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Tokens per selection bucket (the top BUCKET_BITS of each key)."""
    buckets = (keys >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)
    return np.bincount(buckets, weights=weights, minlength=BUCKETS).astype(np.int64)


def selection_limits(
    histograms: Mapping[str, np.ndarray], shares: Mapping[str, float], budget: int | None
) -> dict[str, int]:
    """Per group, keep the fragments in selection buckets [0, limit) so that groups meet their
    token shares: the total is the largest one every group can fill at its share, capped by the
    budget; each group then takes the bucket prefix whose tokens come closest to its quota.

    Why buckets rather than a sort of every fragment's key: each input reports a fixed 2**16-entry
    histogram however large it is, so the driver's work does not grow with the genome count, and
    a bucket holds about 1/65536 of a group's tokens, far inside the 1-point share tolerance
    (with few fragments, a bucket holds at most one and the choice is exact to a fragment).
    """
    totals = {group: int(histograms[group].sum()) for group in shares}
    for group, share in shares.items():
        if share > 0 and totals[group] == 0:
            raise ConfigError(f"group {group!r} has no fragments left after filtering, so its share {share} "
                              "cannot be met; check its inputs or group_shares")
    total = min(totals[group] / share for group, share in shares.items() if share > 0)
    if budget is not None:
        total = min(total, budget)
    limits = {}
    for group, share in shares.items():
        quota = total * share
        cumulative = np.concatenate([[0], np.cumsum(histograms[group])])  # tokens below each limit
        if quota >= totals[group]:
            limits[group] = KEEP_ALL
            continue
        above = int(np.searchsorted(cumulative, quota, side="left"))  # first limit reaching the quota
        candidates = (above - 1, above) if above > 0 else (above,)
        limits[group] = min(candidates, key=lambda limit: abs(cumulative[limit] - quota))
    return limits
