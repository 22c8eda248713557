"""Contract 1 of ARCHITECTURE.md: the DNA vocabulary, defined once and imported everywhere.

| token | PAD | A | C | G | T | N | EOD |
|  id   |  0  | 1 | 2 | 3 | 4 | 5 |  6  |

Id 7 is spare, so the vocabulary (and the embedding table) has 8 rows.

Everything here works on whole buffers: `bytes.translate` for text -> ids and numpy
fancy indexing for ids -> ids. A genome is billions of bases, so a per-character
Python loop is never acceptable.
"""

from __future__ import annotations

import numpy as np

PAD, A, C, G, T, N, EOD = range(7)
VOCAB_SIZE = 8
TOKENS: tuple[str, ...] = ("<pad>", "A", "C", "G", "T", "N", "<eod>")
BASE_IDS: tuple[int, ...] = (A, C, G, T, N)

# Gengram reads bases as base-5 digits A=0 C=1 G=2 T=3 N=4. Tokens that are not bases
# (PAD, EOD, the spare id) have no digit: an n-gram that touches one is not looked up.
NO_DIGIT = -1
GENGRAM_DIGIT: tuple[int, ...] = tuple(
    {A: 0, C: 1, G: 2, T: 3, N: 4}.get(token_id, NO_DIGIT) for token_id in range(VOCAB_SIZE)
)
GENGRAM_RADIX = 5

# Byte value that marks a character outside the alphabet after translation. It is not a
# token id, so it can never be confused with a valid base.
INVALID = 0xFF
IUPAC_AMBIGUITY = b"RYSWKMBDHV"


def _encode_table() -> bytes:
    table = bytearray([INVALID]) * 256
    for letter, token_id in zip(b"ACGTN", (A, C, G, T, N), strict=True):
        table[letter] = token_id
    for letter in IUPAC_AMBIGUITY:
        table[letter] = N
    # Soft-masked (lower-case) sequence keeps its base.
    for upper in b"ACGTN" + IUPAC_AMBIGUITY:
        table[upper + 32] = table[upper]
    return bytes(table)


ENCODE_TABLE = _encode_table()
DECODE_TABLE = np.frombuffer(b"-ACGTN|?", dtype=np.uint8)  # PAD '-', EOD '|', spare '?'
COMPLEMENT = np.array([PAD, T, G, C, A, N, EOD, 7], dtype=np.uint8)


class InvalidSequenceError(ValueError):
    """A sequence holds a character outside the alphabet; `offset` is its 0-based position."""

    def __init__(self, offset: int, character: str):
        super().__init__(f"invalid character {character!r} at offset {offset}")
        self.offset = offset
        self.character = character


def encode(sequence: bytes | str) -> np.ndarray:
    """Normalise and encode sequence text (no whitespace) to uint8 token ids.

    Upper-cases soft-masked bases, maps IUPAC ambiguity codes to N, and raises
    `InvalidSequenceError` naming the first character outside the alphabet.
    """
    raw = sequence.encode("ascii", errors="replace") if isinstance(sequence, str) else bytes(sequence)
    translated = raw.translate(ENCODE_TABLE)
    bad = translated.find(INVALID)
    if bad >= 0:
        raise InvalidSequenceError(bad, chr(raw[bad]))
    return np.frombuffer(translated, dtype=np.uint8)


def decode(ids: np.ndarray | list[int]) -> str:
    """Token ids back to text: bases as letters, PAD as '-', EOD as '|'."""
    return DECODE_TABLE[np.asarray(ids, dtype=np.uint8)].tobytes().decode("ascii")


def reverse_complement(ids: np.ndarray) -> np.ndarray:
    """Reverse complement over ids (A<->T, C<->G, N, PAD and EOD map to themselves)."""
    return COMPLEMENT[np.asarray(ids, dtype=np.uint8)[::-1]]


def acgt_fraction(ids: np.ndarray) -> float:
    """Share of positions holding an unambiguous base (A, C, G or T)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return 0.0
    return float(np.count_nonzero((ids >= A) & (ids <= T)) / ids.size)
