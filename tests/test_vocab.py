"""Contract 1: the vocabulary, checked on hand-made strings and on the real rCRS reference."""

import numpy as np
import pytest
from conftest import RCRS_FASTA

from model import vocab


def test_ids_follow_the_contract():
    assert (vocab.PAD, vocab.A, vocab.C, vocab.G, vocab.T, vocab.N, vocab.EOD) == tuple(range(7))
    assert vocab.VOCAB_SIZE == 8
    assert vocab.GENGRAM_DIGIT[: vocab.EOD + 1] == (-1, 0, 1, 2, 3, 4, -1)


def test_encode_normalises_case_and_ambiguity_codes():
    ids = vocab.encode(b"ACGTNacgtnRYSWKMBDHVryswkmbdhv")
    assert ids.dtype == np.uint8
    assert ids[:10].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert set(ids[10:].tolist()) == {vocab.N}


@pytest.mark.parametrize(("text", "offset", "char"), [("ACGU", 3, "U"), ("AC-GT", 2, "-"), ("ACGT\r", 4, "\r")])
def test_encode_names_the_first_invalid_character(text, offset, char):
    with pytest.raises(vocab.InvalidSequenceError) as error:
        vocab.encode(text)
    assert (error.value.offset, error.value.character) == (offset, char)
    assert repr(char) in str(error.value)


def test_decode_and_reverse_complement():
    ids = np.array([vocab.PAD, vocab.A, vocab.C, vocab.G, vocab.T, vocab.N, vocab.EOD], dtype=np.uint8)
    assert vocab.decode(ids) == "-ACGTN|"
    assert vocab.decode(vocab.reverse_complement(vocab.encode("AACGTN"))) == "NACGTT"
    rng = np.random.default_rng(0)
    random_ids = rng.integers(0, 7, size=1000).astype(np.uint8)
    assert np.array_equal(vocab.reverse_complement(vocab.reverse_complement(random_ids)), random_ids)


def test_acgt_fraction():
    assert vocab.acgt_fraction(vocab.encode("ACGTNNNN")) == 0.5
    assert vocab.acgt_fraction(np.array([], dtype=np.uint8)) == 0.0


def test_real_rcrs_base_counts():
    """rCRS (NC_012920.1, real data): 16,569 bp, A 5124, C 5181, G 2169, T 4094, one N."""
    lines = RCRS_FASTA.read_bytes().splitlines()
    assert lines[0].startswith(b">")
    ids = vocab.encode(b"".join(line.strip() for line in lines[1:]))
    counts = np.bincount(ids, minlength=vocab.VOCAB_SIZE)
    assert ids.size == 16569
    assert counts[[vocab.A, vocab.C, vocab.G, vocab.T, vocab.N]].tolist() == [5124, 5181, 2169, 4094, 1]
