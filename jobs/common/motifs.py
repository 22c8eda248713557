"""Transcription-factor profiles from JASPAR, whose databases the `pyjaspar` package ships: the count
matrices that jobs.evaluate's motif tasks and the generated genomes (jobs/tokenize/genomes.py) draw
their sites from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from model.vocab import A, C, G, T

MOTIF_BASES = np.array([A, C, G, T], dtype=np.uint8)  # the row order of a JASPAR count matrix
# A quarter of a count per base keeps a base that no aligned site showed possible, without
# flattening profiles that are built from hundreds of sites.
PSEUDOCOUNT = 0.25
RELEASE = "JASPAR2024"


@dataclass(frozen=True, eq=False)
class Profile:
    matrix_id: str  # versioned, e.g. MA0139.2
    name: str  # the factor, e.g. CTCF
    probabilities: np.ndarray  # (site length, 4): per position, A C G T

    @property
    def length(self) -> int:
        return len(self.probabilities)

    def sample(self, uniforms: np.ndarray) -> np.ndarray:
        """Sites as token ids, one per row of `uniforms` (shape (..., length), values in [0, 1)), each base
        drawn from its position's column by inverse CDF, so any generator's uniforms serve."""
        below = np.cumsum(self.probabilities, axis=1)[:, :3]
        return MOTIF_BASES[(uniforms[..., None] >= below).sum(axis=-1)]


def releases() -> tuple[str, ...]:
    from pyjaspar import jaspar_releases

    return tuple(jaspar_releases)


@functools.cache
def load_profile(motif_id: str, release: str = RELEASE) -> Profile:
    """The profile `motif_id` (MA0139 for the latest version, MA0139.2 for that one); KeyError if absent."""
    from pyjaspar import jaspardb

    motif = jaspardb(release=release).fetch_motif_by_id(motif_id)
    if motif is None:
        raise KeyError(f"{motif_id} is not in {release}")
    counts = np.array([motif.counts[base] for base in "ACGT"], dtype=np.float64).T + PSEUDOCOUNT
    return Profile(motif.matrix_id, motif.name, counts / counts.sum(axis=1, keepdims=True))
