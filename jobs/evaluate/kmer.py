"""The classic baseline featuriser: each sequence as its k-mer spectrum, the share of each ACGT k-mer
among the sequence's k-mer positions, for several k at once.

Column order: k ascending, and within one k the k-mers in lexicographic order (A < C < G < T), which
is their value as a base-4 number (A=0, C=1, G=2, T=3). A k-mer that touches N is not counted, and
neither is its position: each k's block of a row sums to 1, or is all 0 when the sequence has no
k-mer without N.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from model.vocab import A, N, encode

BASES = "ACGT"
KMER_SIZES = (1, 2, 3, 4, 5, 6)
# Sequences counted together: bounds the k=6 count table (rows x 4096 int64) at ~32 MB.
SEQUENCES_PER_BLOCK = 1024


def kmer_names(ks: Sequence[int] = KMER_SIZES) -> list[str]:
    """Feature names of `kmer_spectrum`'s columns, in its order."""
    return ["".join(kmer) for k in ks for kmer in itertools.product(BASES, repeat=k)]


def kmer_spectrum(sequences: Sequence[str], ks: Sequence[int] = KMER_SIZES) -> np.ndarray:
    """float32 [len(sequences), sum(4**k)]: per sequence and k, k-mer counts over k-mer positions without N.
    Sequences are normalised text (A, C, G, T, N; Contract 1), as the tasks hold them."""
    if not ks or min(ks) < 1:
        raise ValueError(f"k-mer sizes must be positive, not {list(ks)}")
    blocks = [_spectrum_block(sequences[start : start + SEQUENCES_PER_BLOCK], ks)
              for start in range(0, len(sequences), SEQUENCES_PER_BLOCK)]
    return np.concatenate(blocks) if blocks else np.zeros((0, sum(4**k for k in ks)), np.float32)


def _spectrum_block(sequences: Sequence[str], ks: Sequence[int]) -> np.ndarray:
    # All sequences as one buffer, joined by N: a k-mer that would span two sequences touches that N,
    # so it is skipped like any other, and every sequence is counted in the same numpy passes.
    ids = encode("N".join(sequences))
    is_n = ids == N
    digits = np.where(is_n, 0, ids - A).astype(np.int64)  # N's digit is never used: its k-mers are masked
    lengths = np.fromiter((len(sequence) for sequence in sequences), np.int64, len(sequences))
    sequence_of = np.repeat(np.arange(len(sequences)), lengths + 1)[: len(ids)]  # + 1: the separator after it
    n_before = np.concatenate([[0], np.cumsum(is_n)])

    shares_by_k = {}
    codes = np.zeros(len(ids), np.int64)  # codes[i]: the k-mer starting at i, built up one k at a time
    for k in range(1, max(ks) + 1):
        codes = codes[: max(len(ids) - k + 1, 0)] * 4 + digits[k - 1 :]
        if k not in ks:
            continue
        clean = n_before[k : k + len(codes)] == n_before[: len(codes)]  # no N in [i, i + k)
        owner = sequence_of[: len(codes)][clean]
        counts = np.bincount(owner * 4**k + codes[clean], minlength=len(sequences) * 4**k)
        positions = np.bincount(owner, minlength=len(sequences))
        shares = counts.reshape(len(sequences), 4**k) / np.maximum(positions, 1)[:, None]
        shares_by_k[k] = shares.astype(np.float32)
    return np.concatenate([shares_by_k[k] for k in ks], axis=1)
