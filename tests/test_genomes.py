"""The genome generator (jobs/tokenize/genomes.py): what its GFF3 says was planted is in the FASTA where it
says, and its Markov background has the k-mer statistics of the real sequence it was fitted to (the rCRS,
real). Everything else here is generated sequence."""

from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest

from jobs.common import motifs
from jobs.tokenize import genomes

RECIPE = genomes.Recipe(name="generated-test", contigs=(60_000, 12_000), seed=7)
COMPLEMENT = bytes.maketrans(b"ACGTNacgtn", b"TGCANtgcan")


def reverse_complement(text: bytes) -> bytes:
    return text[::-1].translate(COMPLEMENT)


def parse(fasta: bytes, gff: bytes) -> tuple[dict[str, bytes], list[dict]]:
    sequences, name = {}, None
    for line in fasta.splitlines():
        if line.startswith(b">"):
            name = line[1:].split()[0].decode()
            sequences[name] = b""
        else:
            sequences[name] += line.strip()
    features = []
    for line in gff.decode().splitlines():
        if line.startswith("#"):
            continue
        seqid, source, kind, start, end, _, strand, _, attributes = line.split("\t")
        features.append({"seqid": seqid, "source": source, "type": kind, "start": int(start), "end": int(end),
                         "strand": strand, **dict(field.split("=", 1) for field in attributes.split(";"))})
    return sequences, features


@pytest.fixture(scope="module")
def planted():
    return parse(*genomes.files(RECIPE))


def span(sequences, feature) -> bytes:
    return sequences[feature["seqid"]][feature["start"] - 1 : feature["end"]]


def test_every_planted_site_is_where_the_gff_says_on_its_strand(planted):
    sequences, features = planted
    sites = [f for f in features if f["type"] == "TF_binding_site"]
    assert len(sites) > 50
    scores = []
    for site in sites:
        text = span(sequences, site)
        assert text.isupper(), site["ID"]  # sites are never soft-masked
        on_strand = text if site["strand"] == "+" else reverse_complement(text)
        assert on_strand.decode() == site["sequence"], site["ID"]
        profile = motifs.load_profile(site["motif"])
        assert len(on_strand) == profile.length, site["ID"]
        digits = np.searchsorted(np.frombuffer(b"ACGT", dtype=np.uint8), np.frombuffer(on_strand, dtype=np.uint8))
        scores.append(np.log(profile.probabilities[np.arange(profile.length), digits] * 4).sum())
    # Sampled from their profiles, sites score well above a uniform background on average (one drawn
    # from a weak profile's tails may not).
    assert np.mean(scores) > 5 and np.mean(np.array(scores) > 0) > 0.9
    modules = {f["ID"]: f for f in features if f["type"] == "CRM"}
    for site in sites:
        module = modules[site["Parent"]]
        assert module["start"] <= site["start"] and site["end"] <= module["end"], site["ID"]


def test_cooperative_pairs_keep_their_spacing_and_strand(planted):
    _, features = planted
    pairs: dict[str, list[dict]] = {}
    for feature in features:
        if "pair" in feature:
            pairs.setdefault(feature["pair"], []).append(feature)
    assert len(pairs) > 10
    spacing = {(p.first, p.second): p.spacing for p in genomes.Structure().pairs}
    for name, members in pairs.items():
        key = next(k for k in spacing if {motifs.load_profile(m).matrix_id for m in k} == {m["motif"] for m in members})
        first, second = sorted(members, key=lambda m: m["motif"] != motifs.load_profile(key[0]).matrix_id)
        assert first["strand"] == second["strand"], name
        if first["strand"] == "+":  # start to start on the pair's own strand
            assert second["start"] - first["start"] == spacing[key], name
        else:
            assert first["end"] - second["end"] == spacing[key], name


def test_repeats_are_soft_masked_copies_of_their_family_within_their_divergence(planted):
    sequences, features = planted
    families = genomes.Families(RECIPE.structure)
    consensus = {"SINE-1": families.sine.tobytes(), "LINE-1": families.line.tobytes()}
    repeats = [f for f in features if f["type"] in ("SINE_element", "LINE_element")]
    assert {f["family"] for f in repeats} == {"SINE-1", "LINE-1"}
    low, high = RECIPE.structure.sine_divergence
    assert all(low <= float(f["divergence"]) <= high for f in repeats if f["family"] == "SINE-1")
    for repeat in repeats:
        text = span(sequences, repeat)
        assert text.islower(), repeat["ID"]
        copy = (text if repeat["strand"] == "+" else reverse_complement(text)).upper()
        source = consensus[repeat["family"]][-len(copy) :]  # LINE copies are 5'-truncated
        mismatches = sum(a != b for a, b in zip(copy, source, strict=True)) / len(copy)
        # Mutated bases are redrawn uniformly, so a quarter of them land on the same base.
        assert mismatches <= float(repeat["divergence"]) * 0.75 + 4 / np.sqrt(len(copy)) * 0.5, repeat["ID"]
    for satellite in (f for f in features if f["type"] == "microsatellite"):
        text, unit = span(sequences, satellite), satellite["unit"].lower().encode()
        tiled = (unit * len(text))[: len(text)]
        assert text.islower() and sum(a != b for a, b in zip(text, tiled, strict=True)) <= 0.03 * len(text) + 4


def test_gaps_are_runs_of_n_and_elements_never_overlap(planted):
    sequences, features = planted
    for gap in (f for f in features if f["type"] == "gap"):
        assert set(span(sequences, gap)) == {ord("N")}
    covered: dict[str, np.ndarray] = {name: np.zeros(len(s), dtype=int) for name, s in sequences.items()}
    for feature in features:
        if feature["type"] not in ("TF_binding_site",):  # sites lie inside their module
            covered[feature["seqid"]][feature["start"] - 1 : feature["end"]] += 1
    assert max(c.max() for c in covered.values()) == 1
    lengths = {name: len(s) for name, s in sequences.items()}
    total = sum(lengths.values())
    by_type = {kind: sum(f["end"] - f["start"] + 1 for f in features if f["type"] == kind) / total
               for kind in ("SINE_element", "LINE_element", "microsatellite")}
    structure = RECIPE.structure
    assert by_type["SINE_element"] == pytest.approx(structure.sine_fraction, abs=0.02)
    assert by_type["LINE_element"] == pytest.approx(structure.line_fraction, abs=0.03)
    assert by_type["microsatellite"] == pytest.approx(structure.microsatellite_fraction, abs=0.01)


def kmer_frequencies(text: bytes, k: int) -> dict[bytes, float]:
    """Both strands, windows of A/C/G/T only, counted independently of the generator's code."""
    counts: dict[bytes, int] = dict.fromkeys((bytes(p) for p in itertools.product(b"ACGT", repeat=k)), 0)
    for strand in (text.upper(), reverse_complement(text.upper())):
        for i in range(len(strand) - k + 1):
            word = strand[i : i + k]
            if word in counts:
                counts[word] += 1
    total = sum(counts.values())
    return {word: count / total for word, count in counts.items()}


def test_the_markov_background_has_the_kmer_statistics_of_the_real_sequence_it_was_fitted_to():
    rcrs = b"".join(parse(genomes.RCRS.read_bytes().replace(b"\r", b""), b"")[0].values())  # real, NC_012920.1
    background_only = genomes.Structure(sine_fraction=0, line_fraction=0, microsatellite_fraction=0,
                                        modules_per_kb=0, gaps_per_contig=0, ambiguity_per_mbp=0)
    generated = genomes.fasta_bytes(genomes.Recipe(name="generated-background", contigs=(300_000,), seed=3,
                                                   structure=background_only))
    generated = b"".join(parse(generated, b"")[0].values())
    uniform = genomes.fasta_bytes(genomes.Recipe(name="generated-iid", contigs=(300_000,), seed=3, structure="iid"))
    uniform = b"".join(parse(uniform, b"")[0].values())
    for k in (1, 2, 3, 4):
        real = kmer_frequencies(rcrs, k)
        distance = {name: 0.5 * sum(abs(real[w] - f[w]) for w in real)
                    for name, f in (("markov", kmer_frequencies(generated, k)), ("iid", kmer_frequencies(uniform, k)))}
        assert distance["markov"] < 0.02, (k, distance)  # total variation distance
        assert distance["iid"] > 3 * distance["markov"], (k, distance)  # the check can tell


def test_iid_genomes_are_uniform_and_plant_nothing():
    fasta, gff = genomes.files(genomes.Recipe(name="generated-iid", contigs=(50_000,), seed=1, structure="iid"))
    sequences, features = parse(fasta, gff)
    assert features == []
    counts = np.bincount(np.frombuffer(sequences["chr1"], dtype=np.uint8), minlength=256)[list(b"ACGT")]
    assert np.all(np.abs(counts / counts.sum() - 0.25) < 0.01) and counts.sum() == 50_000


def test_written_files_are_gzip_and_the_same_recipe_gives_the_same_bytes(tmp_path):
    path = genomes.write_genome(RECIPE, tmp_path)
    again = genomes.write_genome(RECIPE, tmp_path / "again")
    assert path.read_bytes() == again.read_bytes()
    gff = gzip.decompress((tmp_path / "generated-test.gff3.gz").read_bytes())
    assert gff.startswith(b"##gff-version 3\n")


def test_a_pair_that_does_not_fit_its_spacing_is_refused():
    structure = genomes.Structure(pairs=[{"first": "MA0139", "second": "MA0108", "spacing": 10}])
    with pytest.raises(ValueError, match="MA0139 is 15 bases long, more than its spacing 10"):
        genomes.Families(structure)


def test_a_divergence_range_upside_down_is_refused():
    with pytest.raises(ValueError, match=r"sine_divergence: \(0.1, 0.05\) is not a range"):
        genomes.Structure(sine_divergence=(0.1, 0.05))


def test_structures_are_named_by_config_and_an_unknown_name_is_refused():
    assert genomes.Recipe(name="generated-x", contigs=(10,), seed=0, structure="quickstart").structure == \
        genomes.QUICKSTART_STRUCTURE
    with pytest.raises(ValueError, match=r"no structure is named 'alu-rich'; name one of \['iid', 'quickstart'\]"):
        genomes.Recipe(name="generated-x", contigs=(10,), seed=0, structure="alu-rich")
