"""The tokenize job's parts without Ray: FASTA reading, annotations, fragments, balancing,
config, manifests and the generated genomes. Fast; one test serves files over HTTP on 127.0.0.1."""

import gzip
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import RCRS_FASTA, ROOT

from jobs.common import fasta, storage
from jobs.common.config import ConfigError, build_config, load_config
from jobs.common.dataset import SCHEMA_VERSION, Manifest, check_compatible, load_manifest
from jobs.common.fasta import InputError, Source, ncbi_member, read_fasta
from jobs.common.genes import GeneIndex
from jobs.tokenize import TokenizeConfig, genomes
from jobs.tokenize.assemblies import AssemblyList, InputSpec, load_assembly_list, ncbi_download_url
from jobs.tokenize.fragments import (
    BUCKETS,
    KEEP_ALL,
    FragmentFilter,
    FragmentSpec,
    InputStats,
    Windower,
    below,
    reverse_complement,
    selection_limits,
    window_keys,
)
from jobs.tokenize.plan import group_rows, make_plan
from model.vocab import PAD, decode, encode

SPEC = FragmentSpec(seq_len=8, pad_final=False, min_acgt_fraction=0.5, gene_flank=None, strand="forward",
                    reverse_prob=0.56, val_fraction=0.0, seed=0)


def records(path: Path) -> dict[str, str]:
    """Record name -> decoded sequence, via the streaming reader."""
    out: dict[str, str] = {}
    for name, ids in read_fasta(Source(str(path))):
        out[name] = out.get(name, "") + decode(ids)
    return out


def reference_records(text: str) -> dict[str, str]:
    """An independent, line-by-line parse: the behaviour the streaming reader must match."""
    out: dict[str, str] = {}
    name = None
    for line in text.split("\n"):
        line = line.rstrip(" \t\r")
        if line.startswith(">"):
            name = line[1:].split()[0]
            out[name] = ""
        elif line:
            out[name] += decode(encode(line))
    return out


# --- FASTA ------------------------------------------------------------------------------------------


def test_rcrs_reads_as_the_reference():
    text = RCRS_FASTA.read_bytes()
    assert b"\r\n" in text  # the file is CRLF
    parsed = records(RCRS_FASTA)
    assert list(parsed) == ["rCRS"]
    sequence = parsed["rCRS"]
    assert len(sequence) == 16569
    counts = {base: sequence.count(base) for base in "ACGTN"}
    assert counts == {"A": 5124, "C": 5181, "G": 2169, "T": 4094, "N": 1}
    assert sequence == reference_records(text.decode())["rCRS"]


def test_line_ends_blank_lines_case_and_ambiguity_codes_normalise_alike(tmp_path):
    variants = {
        "lf": ">x desc\nACGTacgtNRYK\nGGCC\n>y\nTTTT\n",
        "crlf": ">x desc\r\nACGTacgtNRYK\r\nGGCC\r\n>y\r\nTTTT\r\n",
        "blanks": "\n\n>x desc\nACGTacgt  \nNRYK\t\n\n \nGGCC\n>y \nTT\r\nTT",
        "one line": ">x desc\nACGTACGTNNNNGGCC\n>y\nTTTT",
    }
    for name, text in variants.items():
        (tmp_path / name).write_text(text)
        assert records(tmp_path / name) == {"x": "ACGTACGTNNNNGGCC", "y": "TTTT"}, name


def test_any_block_size_gives_the_same_records(tmp_path, monkeypatch):
    """Random FASTA text with every tolerated oddity, cut into blocks of random tiny sizes."""
    rng = random.Random(7)
    parts = []
    for number in range(30):
        parts.append(f">c{number} some description{' ' * rng.randint(0, 2)}")
        length = rng.choice([0, 1, 5, 37, 200])
        sequence = "".join(rng.choice("ACGTacgtNRY") for _ in range(length))
        width = rng.choice([1, 7, 60, 1000])
        for i in range(0, length, width):
            parts.append(sequence[i : i + width] + rng.choice(["", " ", "\t", "  \r"]))
        parts.extend([""] * rng.randint(0, 2))
    text = "\n".join(parts)
    for line_end in ("\n", "\r\n"):
        path = tmp_path / "random.fa"
        path.write_text(text.replace("\n", line_end))
        expected = reference_records(text)
        for block in (1, 2, 3, 5, 64, 4096):
            monkeypatch.setattr(fasta, "BLOCK_BYTES", block)
            monkeypatch.setattr(fasta, "MIN_BLOCK_BYTES", block)
            assert records(path) == expected, (block, line_end)


def test_every_record_starts_with_an_empty_piece(tmp_path):
    path = tmp_path / "empty-records.fa"
    path.write_text(">a\n>b\nACGT\n>c\n")
    assert [(name, ids.tolist()) for name, ids in read_fasta(Source(str(path)))] == [
        ("a", []), ("b", []), ("b", [1, 2, 3, 4]), ("c", [])
    ]


def test_gzip_multi_member_and_bgzip_like_blocks_read_as_plain(tmp_path):
    text = RCRS_FASTA.read_bytes()
    (tmp_path / "one.gz").write_bytes(gzip.compress(text))
    (tmp_path / "many.gz").write_bytes(genomes.gzip_bytes(text, members=40) + gzip.compress(b""))
    expected = records(RCRS_FASTA)
    assert records(tmp_path / "one.gz") == expected
    assert records(tmp_path / "many.gz") == expected


def write_error_case(tmp_path: Path, case: str) -> Path:
    """A malformed input of each kind the job must refuse."""
    path = tmp_path / f"{case}.fa"
    bases = np.frombuffer(b"ACGT", np.uint8)[np.random.RandomState(0).randint(0, 4, 60_000)].tobytes()
    good = gzip.compress(b">chr1\n" + b"\n".join(bases[i : i + 60] for i in range(0, len(bases), 60)) + b"\n")
    contents = {
        "invalid-character": b">chr1 ok\nACGT\nACXT\n",
        "sequence-before-header": b"\nACGT\n>chr1\nACGT\n",
        "fastq": b"@read1\nACGT\n+\nIIII\n",
        "truncated-gzip": good[: len(good) // 2],
        "corrupt-gzip": good[:5000] + bytes([good[5000] ^ 0xFF]) + good[5001:],
        "repeated-contig": b">chr1\nACGT\n>chr2\nAC\n>chr1 again\nGG\n",
        "nameless-header": b">chr1\nACGT\n> \nACGT\n",
        "empty": b"",
    }
    path.write_bytes(contents[case])
    return path


ERRORS = {
    "invalid-character": ("invalid character 'X'", "record 'chr1', line 3"),
    "sequence-before-header": ("sequence line before any '>' header", "line 2"),
    "fastq": ("FASTQ", "line 1"),
    "truncated-gzip": ("truncated", "record 'chr1', line"),
    "corrupt-gzip": ("corrupt gzip data", "record 'chr1', line"),
    "repeated-contig": ("contig name repeated in this assembly (first at line 1)", "record 'chr1', line 5"),
    "nameless-header": ("header line has no sequence name", "line 3"),
    "empty": ("no FASTA records", ""),
}


@pytest.mark.parametrize("case", ERRORS)
def test_malformed_inputs_are_refused_naming_file_record_and_line(tmp_path, monkeypatch, case):
    monkeypatch.setattr(fasta, "READ_BYTES", 256)  # small reads: the readable part ends near the damage
    path = write_error_case(tmp_path, case)
    with pytest.raises(InputError) as error:
        for _ in read_fasta(Source(str(path))):
            pass
    problem, where = ERRORS[case]
    assert str(error.value).startswith(str(path))
    assert problem in str(error.value)
    assert where in str(error.value)


def ncbi_package(path: Path, accession: str, fasta_text: bytes, gff: bytes | None = None) -> Path:
    """A zip with the layout of an NCBI Datasets genome package."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.md", "NCBI Datasets")
        archive.writestr("ncbi_dataset/data/assembly_data_report.jsonl", "{}")
        archive.writestr(f"ncbi_dataset/data/{accession}/cds_from_genomic.fna", ">cds\nATG\n")
        archive.writestr(f"ncbi_dataset/data/{accession}/{accession}_TestAsm1.0_genomic.fna", fasta_text)
        if gff is not None:
            archive.writestr(f"ncbi_dataset/data/{accession}/genomic.gff", gff)
    return path


def test_ncbi_accession_resolves_to_a_datasets_package_that_is_read(tmp_path):
    accession = "GCF_000001405.40"
    url = ncbi_download_url(accession)
    assert url == ("https://api.ncbi.nlm.nih.gov/datasets/v2/genome/accession/GCF_000001405.40/download"
                   "?include_annotation_type=GENOME_FASTA")
    assert ncbi_download_url(accession, annotation=True).endswith("GENOME_FASTA&include_annotation_type=GENOME_GFF")
    assert InputSpec(assembly=accession, organism="Homo sapiens", group="human").resolved().url == url
    with pytest.raises(ValueError, match="no url"):
        InputSpec(assembly="my-genome", organism="x", group="human")

    package = ncbi_package(tmp_path / "package.zip", accession, RCRS_FASTA.read_bytes(), b"##gff-version 3\n")
    source = Source(str(package), pick_member=ncbi_member(accession))
    assert {name: decode(ids) for name, ids in read_fasta(source) if ids.size} == {"rCRS": records(RCRS_FASTA)["rCRS"]}
    assert source.name.endswith(f"[ncbi_dataset/data/{accession}/{accession}_TestAsm1.0_genomic.fna]")
    annotation = Source(str(package), pick_member=ncbi_member(accession, annotation=True))
    assert b"".join(annotation.chunks()) == b"##gff-version 3\n"
    two = ncbi_package(tmp_path / "two.zip", "GCA_000000001.1", b">a\nA\n")
    with zipfile.ZipFile(two, "a") as archive:
        archive.writestr("ncbi_dataset/data/GCA_000000003.1/GCA_000000003.1_X_genomic.fna", ">b\nC\n")
    with pytest.raises(InputError, match=r"not an NCBI Datasets genome package of GCF_999999999\.1"):
        list(read_fasta(Source(str(two), pick_member=ncbi_member("GCF_999999999.1"))))


@pytest.mark.services
def test_inputs_are_read_over_http(tmp_path):
    """https:// inputs go through fsspec's HTTP filesystem; a local server stands in."""
    import functools
    import http.server
    import threading

    accession = "GCA_000000002.1"
    (tmp_path / "rCRS.fa.gz").write_bytes(gzip.compress(RCRS_FASTA.read_bytes()))
    ncbi_package(tmp_path / "package.zip", accession, RCRS_FASTA.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        expected = records(RCRS_FASTA)
        assert records(f"{base}/rCRS.fa.gz") == expected
        package = Source(f"{base}/package.zip", pick_member=ncbi_member(accession))
        assert {name: decode(ids) for name, ids in read_fasta(package) if ids.size} == expected
    finally:
        server.shutdown()


# --- annotations ------------------------------------------------------------------------------------

GFF3 = b"""##gff-version 3
chr1\tRefSeq\tregion\t1\t100000\t.\t+\t.\tID=chr1
chr1\tRefSeq\tgene\t1001\t2000\t.\t+\t.\tID=gene-a
chr1\tRefSeq\tmRNA\t1001\t2000\t.\t+\t.\tParent=gene-a
chr1\tRefSeq\texon\t1001\t1200\t.\t+\t.\tParent=rna-a
chr1\tRefSeq\tpseudogene\t1500\t3000\t.\t-\t.\tID=gene-b
chr2\tEnsembl\tncRNA_gene\t50001\t50010\t.\t+\t.\tID=gene-c
##FASTA
>chr1
ACGT
"""
GTF = b"""chr1\tHAVANA\tgene\t1001\t2000\t.\t+\t.\tgene_id "A";
chr1\tHAVANA\ttranscript\t1001\t2000\t.\t+\t.\tgene_id "A"; transcript_id "A.1";
chr1\tHAVANA\tgene\t1500\t3000\t.\t-\t.\tgene_id "B";
chr2\tHAVANA\tgene\t50001\t50010\t.\t+\t.\tgene_id "C";
"""


@pytest.mark.parametrize("kind", ["gff3", "gtf.gz"])
def test_gene_index_matches_a_brute_force_check(tmp_path, kind):
    path = tmp_path / f"genes.{kind}"
    path.write_bytes(GFF3 if kind == "gff3" else gzip.compress(GTF))
    index = GeneIndex.from_annotation(Source(str(path)), flank=100)
    genes = {"chr1": [(1000, 2000), (1499, 3000)], "chr2": [(50000, 50010)]}  # 0-based half-open
    rng = np.random.default_rng(0)
    for contig in ("chr1", "chr2", "chrX"):
        starts = rng.integers(0, 60000, size=2000)
        lengths = rng.integers(1, 700, size=2000)
        expected = [any(s < hi + 100 and s + length > lo - 100 for lo, hi in genes.get(contig, []))
                    for s, length in zip(starts, lengths, strict=True)]
        assert index.near(contig, starts, lengths).tolist() == expected


def test_bad_annotations_are_refused_with_their_line(tmp_path):
    (tmp_path / "short.gff").write_bytes(b"##gff-version 3\nchr1\tgene\t1\t10\n")
    with pytest.raises(InputError, match=r"short.gff, line 2: not a GFF3/GTF line"):
        GeneIndex.from_annotation(Source(str(tmp_path / "short.gff")), flank=0)
    (tmp_path / "nogenes.gff").write_bytes(b"chr1\tx\texon\t1\t10\t.\t+\t.\t.\n")
    with pytest.raises(InputError, match="no gene features"):
        GeneIndex.from_annotation(Source(str(tmp_path / "nogenes.gff")), flank=0)


# --- fragments --------------------------------------------------------------------------------------


def windows_of(spec: FragmentSpec, pieces: list[tuple[str, str]], stats: InputStats | None = None):
    stats = stats or InputStats()
    windower = Windower(spec, stats)
    out = []
    for contig, text in pieces:
        out += list(windower.feed(contig, encode(text) if text else np.empty(0, np.uint8)))
    out += list(windower.finish())
    return out, stats


def test_windows_start_at_contig_starts_and_never_span_contigs():
    pieces = [("a", ""), ("a", "ACGTACG"), ("a", "TACGTACGTA"), ("b", ""), ("c", ""), ("c", "GGGGCCCCAA")]
    windows, stats = windows_of(SPEC, pieces)
    cut = [(w.contig, int(s), decode(t)) for w in windows for s, t in zip(w.starts, w.tokens, strict=True)]
    assert cut == [("a", 0, "ACGTACGT"), ("a", 8, "ACGTACGT"), ("c", 0, "GGGGCCCC")]
    assert (stats.contigs, stats.empty_records, stats.bases, stats.dropped["partial"]) == (3, 1, 27, 2)

    padded, stats = windows_of(FragmentSpec(**{**SPEC.__dict__, "pad_final": True}), pieces)
    tail = padded[-1]
    assert (tail.contig, int(tail.starts[0]), decode(tail.tokens[0]), int(tail.lengths[0])) == ("c", 8, "AA------", 2)
    assert stats.padded == 2 and not stats.dropped["partial"]


def test_acgt_filter_and_reverse_complement_of_padded_windows():
    spec = FragmentSpec(**{**SPEC.__dict__, "pad_final": True, "min_acgt_fraction": 0.75, "strand": "both"})
    windows, stats = windows_of(spec, [("a", "ACGTNNAA" "ACGNNNNN" "ACGTTTTT" "CCAN")])
    fragment_filter = FragmentFilter(spec, "asm", None, stats)
    kept = [fragment_filter.fragments(w) for w in windows]
    rows = [(int(s), r, decode(t)) for f in kept if f for s, r, t in zip(f.starts, f.reverse, f.tokens, strict=True)]
    assert rows == [(0, False, "ACGTNNAA"), (0, True, "TTNNACGT"), (16, False, "ACGTTTTT"), (16, True, "AAAAACGT"),
                    (24, False, "CCAN----"), (24, True, "NTGG----")]
    assert stats.dropped["acgt"] == 2 and stats.kept == 6  # fragments, both strands counted


def test_reverse_complement_is_its_own_inverse_and_keeps_padding_last():
    tokens = np.array([encode("ACGTNACG"), np.r_[encode("ACC"), [PAD] * 5]], dtype=np.uint8)
    lengths = np.array([8, 3])
    once = reverse_complement(tokens, lengths)
    assert [decode(row) for row in once] == ["CGTNACGT", "GGT-----"]
    assert (reverse_complement(once, lengths) == tokens).all()


def test_per_fragment_choices_do_not_depend_on_batching():
    starts = np.arange(0, 80_000, 8, dtype=np.int64)
    whole = window_keys(3, "split", "asm", "chr1", starts)
    batched = [window_keys(3, "split", "asm", "chr1", part) for part in np.split(starts, 10)]
    assert (np.concatenate(batched) == whole).all()
    assert not (window_keys(4, "split", "asm", "chr1", starts) == whole).any()
    share = below(whole, 0.2).mean()
    assert 0.19 < share < 0.21
    assert not below(whole, 0).any() and below(whole, 1).all()


def test_random_strand_share_follows_reverse_prob():
    spec = FragmentSpec(**{**SPEC.__dict__, "strand": "random", "min_acgt_fraction": 0})
    rng = np.random.default_rng(1)
    windows, stats = windows_of(spec, [("chr1", decode(rng.integers(1, 5, 8 * 20_000)))])
    fragments = [FragmentFilter(spec, "asm", None, stats).fragments(w) for w in windows]
    reverse = np.concatenate([f.reverse for f in fragments])
    assert abs(reverse.mean() - 0.56) < 0.01


def test_selection_limits_meet_shares_and_budget():
    rng = np.random.default_rng(0)
    histograms = {"human": rng.integers(0, 1000, BUCKETS), "non-human": rng.integers(0, 300, BUCKETS)}
    totals = {group: int(h.sum()) for group, h in histograms.items()}

    def kept(limits):
        return {group: int(histograms[group][: limits[group]].sum()) for group in histograms}

    limits = selection_limits(histograms, {"human": 0.5, "non-human": 0.5}, None)
    assert limits["non-human"] == KEEP_ALL  # the scarcer group is kept whole
    tokens = kept(limits)
    assert abs(tokens["human"] / sum(tokens.values()) - 0.5) < 0.001
    limits = selection_limits(histograms, {"human": 0.7, "non-human": 0.3}, budget=totals["non-human"])
    tokens = kept(limits)
    assert abs(sum(tokens.values()) - totals["non-human"]) / totals["non-human"] < 0.001
    assert abs(tokens["human"] / sum(tokens.values()) - 0.7) < 0.001
    with pytest.raises(ConfigError, match="group 'non-human' has no fragments left"):
        selection_limits({"human": histograms["human"], "non-human": np.zeros(BUCKETS, np.int64)},
                         {"human": 0.5, "non-human": 0.5}, None)


# --- config, plan, manifests --------------------------------------------------------------------------


def quickstart_config(**overrides) -> TokenizeConfig:
    data = {"assemblies": "jobs/assemblies/quickstart.yaml", "output": "state/x", **overrides}
    return TokenizeConfig.model_validate(data)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strandd=both", "strandd: unknown key"),
        ("strand=sideways", "strand: Input should be 'forward', 'random' or 'both'"),
        ("group_shares.human=0.9", "group_shares must sum to 1"),
        ("inputs=[{url: a.fa, assembly: a, organism: x, group: human, colour: red}]", "inputs.0.colour: unknown key"),
        ("storage=[{prefix: 's3://b/', key: AKIA, secret: s}]", "storage.0.key: unknown key"),
        ("storage=[{prefix: 'https://example.org/', anon: true}]", "apply to s3:// and gs:// prefixes"),
        ("seq_len=4", "seq_len: Input should be greater than or equal to 8"),
    ],
)
def test_config_errors_name_their_keys(tmp_path, override, message):
    config = tmp_path / "c.yaml"
    config.write_text("assemblies: jobs/assemblies/quickstart.yaml\noutput: state/x\n")
    with pytest.raises(ConfigError) as error:
        load_config(TokenizeConfig, str(config), [override])
    assert message in str(error.value)


def test_plan_checks_groups_and_assemblies():
    with pytest.raises(ConfigError, match="does not list"):
        make_plan(quickstart_config(group_shares={"human": 1.0}))
    with pytest.raises(ConfigError, match=r"no input has that group"):
        make_plan(quickstart_config(group_shares={"human": 0.4, "non-human": 0.4, "chimp": 0.2}))
    twice = {"url": str(RCRS_FASTA), "assembly": "a", "organism": "x", "group": "human"}
    with pytest.raises(ConfigError, match="unique"):
        make_plan(TokenizeConfig(inputs=[twice, twice], output="x", group_shares={"human": 1}))
    plan = make_plan(quickstart_config())
    assert plan.items[0].url == str(RCRS_FASTA)  # absolute for the tasks
    assert plan.inputs[0].url == "jobs/assemblies/data/rCRS.fasta"  # as recorded
    assert plan.config_hash == make_plan(quickstart_config(output="elsewhere", force=True)).config_hash
    assert plan.config_hash != make_plan(quickstart_config(seed=1)).config_hash


# What the code before the rename (config key `manifest`, lists under jobs/manifests/) computed for the
# paper's dataset config: 494 inputs, all absolute URLs (S3, NCBI Datasets), so a dataset built with it
# before the rename must keep its identity after. That code wrote zstd level 1, since the default is 2.
PAPER_DATASET_HASH = "203e6a0280ec179fd94efce9ba084e5fdf3bcef18b70c5d62fedccdf1dad2a9e"


def test_the_assemblies_rename_keeps_dataset_hashes():
    paper = str(ROOT / "jobs" / "configs" / "tokenize-paper.yaml")
    plan = make_plan(load_config(TokenizeConfig, paper, ["zstd_level=1"]))
    assert len(plan.inputs) == 494
    assert plan.config_hash == PAPER_DATASET_HASH
    # How the inputs are listed is not content: the same inputs inline hash the same.
    inline = TokenizeConfig.model_validate({**plan.config.model_dump(exclude={"assemblies"}),
                                            "inputs": [spec.model_dump() for spec in plan.inputs]})
    assert make_plan(inline).config_hash == PAPER_DATASET_HASH


def test_the_old_assembly_list_key_is_refused_by_its_new_name():
    with pytest.raises(ConfigError, match=r"`manifest` is now `assemblies`"):
        build_config(TokenizeConfig, {"manifest": "jobs/assemblies/quickstart.yaml", "output": "state/x"})


def test_row_groups_hold_64_mib_of_tokens_or_a_shard_size():
    assert group_rows(8192, 256 << 20) == 8192
    assert group_rows(32768, 256 << 20) == 2048
    assert group_rows(1024, 20 << 10) == 20


def test_shipped_assembly_lists_validate():
    paths = (ROOT / "jobs" / "assemblies").glob("*.yaml")
    lists = {path.stem: load_assembly_list(str(path.relative_to(ROOT))) for path in paths}
    assert len(lists["hprc-release2"].inputs) == 464
    assert {spec.group for spec in lists["hprc-release2"].inputs + lists["human-references"].inputs} == {"human"}
    assert all(spec.url.startswith("https://api.ncbi.nlm.nih.gov/") for spec in lists["ncbi-primates"].inputs)
    assert {spec.group for spec in lists["ncbi-primates"].inputs} == {"non-human"}
    quickstart = lists["quickstart"].inputs
    assert all("(synthetic)" in spec.organism for spec in quickstart if "generated" in spec.url)
    assert all(Path(ROOT, spec.url).exists() for spec in quickstart)
    for assemblies in lists.values():
        assert len({spec.assembly for spec in assemblies.inputs}) == len(assemblies.inputs)
    load_config(TokenizeConfig, str(ROOT / "jobs/configs/tokenize-quickstart.yaml"))
    paper = make_plan(load_config(TokenizeConfig, str(ROOT / "jobs/configs/tokenize-paper.yaml")))
    assert len(paper.items) == 464 + 2 + len(lists["ncbi-primates"].inputs)
    assert paper.items[0].options == {"anon": True, "client_kwargs": {"region_name": "us-west-2"}}
    assert isinstance(AssemblyList.model_validate({"inputs": [{"assembly": "GCF_000001405.40", "organism": "h",
                                                               "group": "human"}]}), AssemblyList)


def test_generated_quickstart_genomes_are_reproducible():
    for recipe in genomes.QUICKSTART:
        committed = (genomes.DATA_DIR / f"{recipe.name}.fa.gz").read_bytes()
        assert genomes.gzip_bytes(genomes.fasta_bytes(recipe), recipe.gzip_members) == committed, recipe.name


def test_manifest_loader_checks_version_vocabulary_and_seq_len(tmp_path):
    manifest = {
        "schema_version": SCHEMA_VERSION, "created_by": "test", "seq_len": 1024,
        "vocabulary": {"tokens": ["<pad>", "A", "C", "G", "T", "N", "<eod>"], "size": 8},
        "config": {}, "config_hash": "h", "inputs": [],
        "totals": {"fragments": {"train": {}, "val": {}}, "tokens": {"train": {}, "val": {}}},
        "shares": {"target": {}, "achieved": {}, "achieved_by_split": {"train": {}, "val": {}}}, "shards": [],
    }

    def write(**changes) -> str:
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        return str(tmp_path)

    assert isinstance(load_manifest(write()), Manifest)
    with pytest.raises(ConfigError, match="schema version 99"):
        load_manifest(write(schema_version=99))
    # Version 1 (tokens as list<uint8>) is refused with the way to rebuild, never read as if it were 2.
    with pytest.raises(ConfigError) as refused:
        load_manifest(write(schema_version=1))
    message = str(refused.value)
    assert str(tmp_path) in message and "schema version 1" in message and "force=true" in message
    with pytest.raises(ConfigError, match="vocabulary"):
        load_manifest(write(vocabulary={"tokens": ["A", "C", "G", "T"], "size": 4}))
    with pytest.raises(ConfigError, match="fragments are 1024 tokens long, expected 8192"):
        load_manifest(write(), seq_len=8192)
    with pytest.raises(ConfigError, match="context is 512"):
        check_compatible(load_manifest(write()), vocab_size=8, max_seq_len=512)
    with pytest.raises(ConfigError, match="not a complete dataset"):
        load_manifest(str(tmp_path / "nothing"))


def test_atomic_write_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with pytest.raises(RuntimeError), storage.atomic_write(str(target)) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert not target.exists() and list((tmp_path / "sub").iterdir()) == []
    storage.write_bytes(str(target), b"whole")
    assert target.read_bytes() == b"whole" and storage.list_files(str(target.parent)) == [str(target)]


def test_local_directory_is_the_directory_itself_or_a_copy_removed_after(tmp_path, s3_server):
    storage.write_bytes(str(tmp_path / "model" / "model.pt"), b"weights")
    with storage.local_directory(str(tmp_path / "model")) as local:
        assert local == tmp_path / "model"
    assert (tmp_path / "model" / "model.pt").exists()  # a local directory is never removed

    bucket = s3_server.make_bucket("local-directory")
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    for name, data in (("model.pt", b"weights"), ("model_config.json", b"{}")):
        storage.write_bytes(f"s3://{bucket}/model/{name}", data, options)
    with storage.local_directory(f"s3://{bucket}/model", options) as local:
        assert {p.name: p.read_bytes() for p in local.iterdir()} == {"model.pt": b"weights", "model_config.json": b"{}"}
    assert not local.exists()
