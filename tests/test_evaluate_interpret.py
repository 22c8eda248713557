"""jobs.evaluate.interpret: residual write intensity and its enrichment on features, reverse-complement
symmetry and codon clusters of the memory table, LogitLens-KL, the GFF3/GTF feature reader the tracks come
from, and the plots. Tiny models and tables on CPU; every expected value is built into the input."""

import gzip
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from jobs.common.config import build_config
from jobs.common.fasta import InputError, Source
from jobs.common.genes import Feature, read_features
from jobs.evaluate.analyses import load_sequences
from jobs.evaluate.config import EvaluateConfig
from jobs.evaluate.interpret import (
    GENETIC_CODE,
    SYNONYMOUS_CODONS,
    codon_clusters,
    feature_enrichment,
    logit_lens_kl,
    plot_codon_projection,
    plot_logit_lens,
    plot_write_intensity,
    rc_symmetry,
    span_mask,
    top_peaks,
    write_intensity,
)
from jobs.tokenize import Recipe, write_genome
from model import GengramLM, flavour
from model.config import GengramConfig
from model.gengram import Gengram
from model.vocab import EOD, PAD, encode

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPLEMENT_LETTERS = str.maketrans("ACGT", "TGCA")


def tiny_model(seed: int = 0) -> GengramLM:
    torch.manual_seed(seed)
    return GengramLM(flavour("debug", hidden_size=32, num_layers=3, num_heads=4, num_query_groups=2,
                             moe_ffn_hidden_size=32, ffn_hidden_size=32, gengram_layers=(1, 3)))


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, EOD + 1, (batch, seq), generator=torch.Generator().manual_seed(seed))


def memory_rows(gengram: Gengram, kmers: list[str]) -> torch.Tensor:
    """Table rows of same-length k-mers, read through the module's own lookup."""
    k = len(kmers[0])
    rows, _ = gengram.kmer_rows(torch.tensor(encode("".join(kmers))).view(len(kmers), k))
    return rows[:, -1, gengram.config.ngram_sizes.index(k)]


def all_kmers(k: int) -> list[str]:
    return ["".join(letters) for letters in itertools.product("ACGT", repeat=k)]


# ----------------------------------------------------------------------------- LogitLens-KL


def test_logit_lens_kl_is_zero_at_the_last_layer_and_positive_before_it():
    model = tiny_model().train()
    curve = logit_lens_kl(model, random_ids(2, 48))
    assert curve.shape == (model.config.num_layers + 1,)
    assert curve[-1] == 0
    assert (curve[:-1] > 0).all()
    assert model.training  # the mode it came in with


def test_logit_lens_kl_averages_over_real_positions_only():
    model = tiny_model()
    ids = random_ids(2, 32)
    padded = torch.cat([ids, torch.full((2, 16), PAD)], dim=1)  # a causal model's first 32 positions are unchanged
    np.testing.assert_allclose(logit_lens_kl(model, padded), logit_lens_kl(model, ids), rtol=1e-5)


# ----------------------------------------------------------------------------- residual write intensity


def test_write_intensity_is_the_norm_of_what_each_gengram_module_returns():
    model = tiny_model()
    captured = {}

    def capture(layer_id):
        return lambda module, args, output: captured.__setitem__(layer_id, output.detach())

    hooks = [layer.gengram.register_forward_hook(capture(layer.layer_id))
             for layer in model.layers if layer.gengram is not None]
    traces = write_intensity(model, random_ids(2, 40))
    for hook in hooks:
        hook.remove()
    assert sorted(traces) == sorted(captured) == [1, 3]
    for layer_id, trace in traces.items():
        assert trace.intensity.shape == trace.gate.shape == (2, 40)
        np.testing.assert_allclose(trace.intensity, torch.linalg.vector_norm(captured[layer_id], dim=-1).numpy(),
                                   rtol=1e-6)
        np.testing.assert_array_equal(trace.gate, model.layers[layer_id - 1].gengram.last_gate.numpy())
        assert trace.intensity.max() > 0


def test_a_gengram_whose_value_projection_is_zero_writes_nothing():
    model = tiny_model()
    for layer in model.layers:
        if layer.gengram is not None:
            nn.init.zeros_(layer.gengram.value_proj.weight)
    traces = write_intensity(model, random_ids(2, 40))
    assert sorted(traces) == [1, 3]
    for trace in traces.values():
        assert (trace.intensity == 0).all()
        assert ((trace.gate > 0) & (trace.gate < 1)).all()  # the gate reads the key, which is untouched


def test_feature_enrichment_sees_writes_concentrated_on_features():
    length = 2000
    inside = span_mask([(start, start + 12) for start in range(50, length, 150)], length)  # 13 features
    intensity = np.random.default_rng(0).uniform(0, 1, length) + 4 * inside
    enriched = feature_enrichment(intensity, inside, top=10)
    assert enriched["mean_inside"] > enriched["mean_outside"]
    assert enriched["ratio"] > 1
    assert enriched["top_peak_share"] == 1
    depleted = feature_enrichment(intensity, ~inside, top=10)
    assert depleted["ratio"] < 1
    assert depleted["top_peak_share"] == 0


def test_top_peaks_counts_a_run_of_high_positions_once():
    intensity = np.zeros(200)
    intensity[50:70] = np.linspace(2, 3, 20)  # one motif lifting a run of windows, highest at its end
    intensity[150] = 1
    assert top_peaks(intensity, count=2, spacing=21).tolist() == [69, 150]


def test_span_mask_clips_spans_to_the_sequence():
    assert span_mask([(-3, 2), (4, 6), (8, 20)], 10).tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 1, 1]


# ----------------------------------------------------------------------------- the memory table


def make_rc_symmetric(gengram: Gengram, noise: float) -> None:
    """Each k-mer's row becomes its reverse complement's row plus a little noise (palindromes stay)."""
    with torch.no_grad():
        for k in gengram.config.ngram_sizes:
            rows = memory_rows(gengram, all_kmers(k))
            rc_rows = memory_rows(gengram, [kmer[::-1].translate(COMPLEMENT_LETTERS) for kmer in all_kmers(k)])
            later = rows > rc_rows  # one of each pair copies the other
            table = gengram.memory.weight
            table[rows[later]] = table[rc_rows[later]] + noise * torch.randn(int(later.sum()), table.shape[1])


def test_rc_symmetry_is_significant_on_a_symmetric_table_and_not_on_a_random_one():
    torch.manual_seed(0)
    gengram = Gengram(GengramConfig(hidden_size=16, embed_dim_per_ngram=16))  # k = 1..6
    random_table = rc_symmetry(gengram, layer_id=3, seed=0)
    make_rc_symmetric(gengram, noise=0.01)
    symmetric_table = rc_symmetry(gengram, layer_id=3, seed=0)
    assert [row.k for row in symmetric_table] == [row.k for row in random_table] == [2, 3, 4, 5, 6]
    for row in symmetric_table:
        palindromes = 4 ** (row.k // 2) if row.k % 2 == 0 else 0
        assert row.layer_id == 3 and row.pairs == (4**row.k - palindromes) // 2
        assert row.p_value < 0.01, row
        assert row.rank_biserial > 0.9 and row.rc_distance < row.null_distance
    for row in random_table:
        assert row.p_value > 0.05, row


def test_codon_clusters_recover_a_table_that_encodes_the_genetic_code():
    torch.manual_seed(0)
    gengram = Gengram(GengramConfig(hidden_size=16, ngram_sizes=(2, 3), embed_dim_per_ngram=16))
    random_table = codon_clusters(gengram, seed=0)
    amino_acid_vectors = {amino_acid: torch.randn(16) for amino_acid in SYNONYMOUS_CODONS}
    codons = list(GENETIC_CODE)
    with torch.no_grad():
        gengram.memory.weight[memory_rows(gengram, codons)] = torch.stack(
            [amino_acid_vectors[GENETIC_CODE[codon]] for codon in codons])
    code_table = codon_clusters(gengram, seed=0)
    assert code_table["ari"] > 0.99 and code_table["nmi"] > 0.99
    assert abs(random_table["ari"]) < 0.1


def test_the_genetic_code_is_the_standard_one():
    # NCBI translation table 1 in its compact form: codons over T, C, A, G, first base slowest.
    ncbi = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
    assert GENETIC_CODE == {"".join(codon): aa for codon, aa in zip(itertools.product("TCAG", repeat=3), ncbi,
                                                                    strict=True)}
    assert sum(len(codons.split()) for codons in SYNONYMOUS_CODONS.values()) == 64  # none listed twice


def test_analyses_of_the_memory_need_its_k():
    gengram = Gengram(GengramConfig(hidden_size=16, ngram_sizes=(1, 2), embed_dim_per_ngram=4))
    with pytest.raises(ValueError, match="no 3-mers"):
        codon_clusters(gengram)


# ----------------------------------------------------------------------------- GFF3 / GTF features

GFF3 = b"""##gff-version 3
chr1\tRefSeq\tgene\t1001\t2000\t.\t+\t.\tID=gene-a;Name=TP%3B53
chr1\tRefSeq\texon\t1001\t1200\t.\t+\t.\tID=exon-1;Parent=rna-a

chr2\tRefSeq\tCDS\t5\t10\t.\t-\t0\tParent=rna-b
##FASTA
>chr1
ACGT
"""

GTF = b"""#!genome-build GRCh38
chr1\tHAVANA\tgene\t1001\t2000\t.\t+\t.\tgene_id "ENSG1"; gene_name "TP53";
chr1\tHAVANA\texon\t1001\t1200\t.\t+\t.\tgene_id "ENSG1"; transcript_id "ENST1"; exon_number "1";
"""


def test_read_features_of_any_type_from_gff3_and_gtf(tmp_path):
    (tmp_path / "a.gff3").write_bytes(GFF3)
    (tmp_path / "a.gtf.gz").write_bytes(gzip.compress(GTF))
    assert read_features(Source(str(tmp_path / "a.gff3"))) == [
        Feature("chr1", 1000, 2000, "gene", "+", "TP;53"),
        Feature("chr1", 1000, 1200, "exon", "+", "exon-1"),
        Feature("chr2", 4, 10, "CDS", "-", ""),
    ]
    assert read_features(Source(str(tmp_path / "a.gtf.gz")), types={"exon"}) == [
        Feature("chr1", 1000, 1200, "exon", "+", "ENSG1"),
    ]
    assert [f.name for f in read_features(Source(str(tmp_path / "a.gtf.gz")))] == ["TP53", "ENSG1"]


def test_read_features_names_the_file_and_line_of_a_bad_line(tmp_path):
    (tmp_path / "short.gff3").write_bytes(b"##gff-version 3\nchr1\tx\tgene\t1\t9\t.\t+\t.\t.\nchr1\tgene\t1\t10\n")
    with pytest.raises(InputError, match=r"short\.gff3, line 3: not a GFF3/GTF line"):
        read_features(Source(str(tmp_path / "short.gff3")))
    (tmp_path / "coordinates.gtf").write_bytes(b'chr1\tx\texon\tone\t10\t.\t+\t.\tgene_id "A";\n')
    with pytest.raises(InputError, match=r"coordinates\.gtf, line 1: exon start/end .* not integers"):
        read_features(Source(str(tmp_path / "coordinates.gtf")))


def test_interpretability_windows_centre_on_annotated_features(tmp_path):
    """On a generated genome (not real sequence) and the GFF3 of what was planted in it: `around` cuts a
    window of `length` bases centred on each of the first features of that type, and every track is in
    the window's coordinates (a planted TF site's bases are where its track says)."""
    write_genome(Recipe(name="generated-g", contigs=(20_000, 8_000), seed=4), tmp_path)
    fasta, gff = str(tmp_path / "generated-g.fa.gz"), str(tmp_path / "generated-g.gff3.gz")

    def sequences(**chosen):
        return load_sequences(build_config(EvaluateConfig, {
            "models": [{"name": "kmer", "kind": "kmer"}],
            "interpretability": {"analyses": ["write_intensity"], "sequences": {
                "fasta": fasta, "annotation": gff, "length": 300, "max_sequences": 3, **chosen}}}), [])

    genome, name = {}, None  # read here without the job's reader
    for line in gzip.decompress((tmp_path / "generated-g.fa.gz").read_bytes()).decode().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            genome[name] = ""
        else:
            genome[name] += line
    planted = {}  # (contig, 0-based start) of each + strand TF site -> its bases
    for line in gzip.decompress((tmp_path / "generated-g.gff3.gz").read_bytes()).decode().splitlines():
        fields = line.split("\t")
        if len(fields) == 9 and fields[2] == "TF_binding_site" and fields[6] == "+":
            planted[fields[0], int(fields[3]) - 1] = fields[8].split("sequence=")[1].split(";")[0]
    modules = [f for f in read_features(Source(gff)) if f.type == "CRM"][:3]
    windows = sequences(around="CRM")
    assert len(windows.names) == 3
    for module, name, tokens, tracks in zip(modules, windows.names, windows.tokens, windows.tracks, strict=True):
        contig, span = name.split(":")
        start, end = map(int, span.split("-"))
        assert contig == module.contig and end - start == 300 == len(tokens)
        assert abs((start + end) // 2 - (module.start + module.end) // 2) <= 1
        np.testing.assert_array_equal(tokens, encode(genome[contig][start:end]))
        assert (module.start - start, module.end - start) in tracks["CRM"]
        assert tracks["TF_binding_site"], "a module holds TF sites"
        for site_start, site_end in tracks["TF_binding_site"]:
            bases = planted.get((contig, start + site_start))
            if bases is not None and site_end - site_start == len(bases):
                np.testing.assert_array_equal(tokens[site_start:site_end], encode(bases))
    # Without `around`: each record's first bases, tracks as they are.
    first = sequences()
    assert first.names == ["chr1", "chr2"] and all(len(t) == 300 for t in first.tokens)
    with pytest.raises(InputError, match=r"generated-g\.gff3\.gz: has no feature of type 'gene'"):
        sequences(around="gene")


# ----------------------------------------------------------------------------- plots


def test_the_plots_write_png_files(tmp_path):
    model = tiny_model()
    ids = random_ids(2, 64)
    traces = write_intensity(model, ids)
    tracks = {"exon": [(5, 20), (40, 50)], "TATA box": [(30, 37)]}
    curves = {"gengram": logit_lens_kl(model, ids), "baseline": np.linspace(1, 0, model.config.num_layers + 1)}
    paths = [
        plot_write_intensity(traces, tracks, tmp_path / "writes.png", sequence=1),
        plot_codon_projection(model.layers[0].gengram, tmp_path / "codons.png"),
        plot_logit_lens(curves, tmp_path / "logit_lens.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
