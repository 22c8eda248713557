"""The tokenize job end to end on a local Ray cluster: round trip on rCRS, determinism, re-runs,
crash and re-run, balancing, the gene filter, strands, malformed inputs, NCBI packages and
S3 (moto's server on 127.0.0.1)."""

import gzip
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import RCRS_FASTA, ROOT
from test_tokenize_units import ERRORS, write_error_case

from jobs.common.config import ConfigError
from jobs.common.dataset import load_manifest, read_eval_rows, split_paths, tokens_array
from jobs.common.fasta import InputError
from jobs.tokenize import TokenizeConfig, genomes, run, summary
from model.vocab import PAD, decode, reverse_complement

pytestmark = pytest.mark.ray

RCRS = {"url": str(RCRS_FASTA), "assembly": "NC_012920.1", "organism": "Homo sapiens", "group": "human"}


def generated(tmp_path: Path, name: str, contigs: tuple[int, ...], seed: int, group: str = "non-human") -> dict:
    """A generated genome written as gzipped FASTA, as an input entry."""
    path = genomes.write_genome(genomes.Recipe(name=name, contigs=contigs, seed=seed), tmp_path)
    return {"url": str(path), "assembly": name, "organism": f"{name} (synthetic)", "group": group}


def tokenize(output: Path, **settings):
    settings.setdefault("group_shares", {"human": 1.0})
    return run(TokenizeConfig(output=str(output), **settings))


def read_split(dataset: Path, split: str) -> pa.Table:
    manifest = load_manifest(str(dataset))
    paths, fs = split_paths(manifest, split, str(dataset))
    tables = [pq.read_table(path, filesystem=fs) for path in paths]
    return pa.concat_tables(tables) if tables else None


def files(dataset: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dataset)): p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file()}


def assert_same_dataset(first: Path, second: Path) -> None:
    """Identical shards, and manifests that differ only in where they were written."""
    a, b = files(first), files(second)
    assert a.keys() == b.keys()
    for name in a:
        if name != "manifest.json":
            assert a[name] == b[name], name
    manifests = [load_manifest(str(path)).model_dump() for path in (first, second)]
    for manifest in manifests:
        manifest["config"].pop("output")
    assert manifests[0] == manifests[1]


def reference_sequence(path: Path) -> dict[str, str]:
    """An independent parse: whole file, split on headers, upper-cased, IUPAC codes as N."""
    text = path.read_bytes().decode().replace("\r", "")
    out = {}
    for record in text.split(">")[1:]:
        header, _, body = record.partition("\n")
        sequence = body.replace("\n", "").upper()
        out[header.split()[0]] = "".join(base if base in "ACGTN" else "N" for base in sequence)
    return out


def test_rcrs_round_trip(ray_cluster, tmp_path):
    manifest = tokenize(tmp_path / "rcrs", inputs=[RCRS], seq_len=1000, final_window="pad", strand="both",
                        min_acgt_fraction=0, val_fraction=0.25)
    reference = reference_sequence(RCRS_FASTA)["rCRS"]
    rows = pa.concat_tables([read_split(tmp_path / "rcrs", split) for split in ("train", "val")])
    tokens = tokens_array(rows)
    for row, (start, strand) in enumerate(zip(rows["start"].to_pylist(), rows["strand"].to_pylist(), strict=True)):
        expected = reference[start : start + 1000]
        got = tokens[row]
        if strand == "-":
            real = got[got != PAD]
            got = np.concatenate([reverse_complement(real), got[len(real):]])
        assert decode(got).rstrip("-") == expected, (start, strand)
    # Counts from the independent parse: 17 windows (the last, of 569 bases, padded), two strands each.
    record = manifest.inputs[0]
    assert (record.bases, record.contigs, record.windows, record.padded) == (len(reference), 1, 17, 1)
    assert record.fragments_kept == len(rows) == 34 and sum(record.dropped.values()) == 0
    assert sum(record.tokens.values()) == 2 * len(reference)
    assert sorted(rows["start"].to_pylist()) == sorted(list(range(0, 16569, 1000)) * 2)
    train, val = (set(read_split(tmp_path / "rcrs", split)["start"].to_pylist()) for split in ("train", "val"))
    assert train and val and not train & val  # both strands of a window go to the same split
    assert "NC_012920.1" in summary(manifest)


def test_quickstart_is_deterministic_and_reruns_are_safe(ray_cluster, tmp_path):
    config = yaml.safe_load((ROOT / "jobs/configs/tokenize-quickstart.yaml").read_text())
    config["assemblies"] = str(ROOT / config["assemblies"])
    first, second = tmp_path / "first", tmp_path / "second"
    manifest = run(TokenizeConfig(**{**config, "output": str(first)}))
    run(TokenizeConfig(**{**config, "output": str(second)}))
    assert_same_dataset(first, second)

    # A few hundred fragments, groups within a point of their shares, readable by the pretraining API.
    total = sum(sum(by_group.values()) for by_group in manifest.totals.fragments.values())
    assert 300 <= total <= 500
    for group, share in manifest.shares.achieved.items():
        assert abs(share - manifest.shares.target[group]) <= 0.01
    assert read_eval_rows(manifest, str(first), limit=5).shape == (5, 1024)
    import ray.data

    paths, fs = split_paths(manifest, "train", str(first))
    assert ray.data.read_parquet(paths, filesystem=fs, columns=["tokens"]).count() == sum(
        manifest.totals.fragments["train"].values())

    # Same config again: nothing is rewritten. Another config: refused. force=true: rebuilt.
    stamps = {path: path.stat().st_mtime_ns for path in first.rglob("*")}
    run(TokenizeConfig(**{**config, "output": str(first)}))
    assert stamps == {path: path.stat().st_mtime_ns for path in first.rglob("*")}
    with pytest.raises(ConfigError, match="another config"):
        run(TokenizeConfig(**{**config, "output": str(first), "seed": 1}))
    rebuilt = run(TokenizeConfig(**{**config, "output": str(first), "seed": 1, "force": True}))
    assert rebuilt.config_hash != manifest.config_hash
    assert {shard.path for shard in rebuilt.shards} == {str(p.relative_to(first)) for p in first.glob("*/*")}


def test_crash_then_rerun_matches_an_uninterrupted_run(ray_cluster, tmp_path):
    # Three inputs of 8 Mbp (the same text under three names), plain FASTA: seconds of work, ~60 shards.
    text = genomes.fasta_bytes(genomes.Recipe(name="crash", contigs=(6_000_000, 2_000_000), seed=10))
    inputs = []
    for i in range(3):
        (tmp_path / f"crash-{i}.fa").write_bytes(text)
        inputs.append({"url": str(tmp_path / f"crash-{i}.fa"), "assembly": f"crash-{i}", "organism": "x",
                       "group": "non-human"})
    config = {"inputs": inputs, "seq_len": 1024, "shard_mib": 0.1, "group_shares": {"non-human": 1.0}}
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    run(TokenizeConfig(output=str(reference), **config))

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "output": str(crashed)}))
    command = [sys.executable, "-m", "jobs.tokenize", "--config", str(tmp_path / "config.yaml")]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(crashed.glob("train/part-*.parquet")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.kill()  # SIGKILL: no cleanup of any kind
    job.wait()
    assert not (crashed / "manifest.json").exists(), "the job finished before it could be killed"
    assert len(list(crashed.glob("train/part-*.parquet"))) < len(load_manifest(str(reference)).shards_of("train"))

    run(TokenizeConfig(output=str(crashed), **config))  # the re-run
    assert_same_dataset(reference, crashed)


def test_balancing_meets_group_shares_and_the_token_budget(ray_cluster, tmp_path):
    inputs = [generated(tmp_path, f"h{i}", (size,), seed=20 + i, group="human")
              for i, size in enumerate((300_000, 200_000, 100_000))]
    inputs += [generated(tmp_path, f"p{i}", (size,), seed=30 + i) for i, size in enumerate((150_000, 60_000))]
    shares = {"human": 0.3, "non-human": 0.7}
    manifest = tokenize(tmp_path / "balanced", inputs=inputs, seq_len=1024, group_shares=shares, token_budget=150_000)
    tokens = {group: sum(manifest.totals.tokens[split][group] for split in ("train", "val"))
              for group in ("human", "non-human")}
    assert abs(tokens["human"] / sum(tokens.values()) - 0.3) <= 0.01
    assert abs(manifest.shares.achieved["non-human"] - 0.7) <= 0.01
    assert abs(sum(tokens.values()) - 150_000) <= 2 * 1024
    dropped = sum(record.dropped["balance"] for record in manifest.inputs)
    assert dropped == sum(record.windows - record.fragments_kept - record.dropped["acgt"] - record.dropped["partial"]
                          for record in manifest.inputs)


def test_gene_flank_filter_keeps_fragments_near_genes(ray_cluster, tmp_path):
    source = generated(tmp_path, "genes", (100_000, 50_000), seed=40)
    gff = (b"##gff-version 3\nchr1\tt\tgene\t20001\t21000\t.\t+\t.\tID=a\nchr1\tt\tgene\t70001\t70500\t.\t-\t.\tID=b\n"
           b"chr1\tt\texon\t90001\t90100\t.\t+\t.\tParent=c\n")
    (tmp_path / "genes.gff3.gz").write_bytes(gzip.compress(gff))
    manifest = tokenize(tmp_path / "near-genes", inputs=[{**source, "annotation": str(tmp_path / "genes.gff3.gz")}],
                        seq_len=1000, gene_flank=2000, min_acgt_fraction=0, val_fraction=0,
                        group_shares={"non-human": 1.0})
    rows = read_split(tmp_path / "near-genes", "train")
    kept = sorted(zip(rows["contig"].to_pylist(), rows["start"].to_pylist(), strict=True))
    # Windows [s, s + 1000) that overlap [lo - 2000, hi + 2000) of a gene (0-based half-open).
    expected = [("chr1", s) for s in range(0, 100_000, 1000)
                if 18_000 - 1000 < s < 23_000 or 68_000 - 1000 < s < 72_500]
    assert kept == expected
    assert manifest.inputs[0].dropped["gene_flank"] == 150 - len(expected)
    assert set(rows["strand"].to_pylist()) == {"+"}  # strand=forward, the default

    (tmp_path / "other.gff").write_bytes(b"NC_1\tt\tgene\t1\t100\t.\t+\t.\tID=a\n")
    with pytest.raises(InputError, match=r"no contig .* has a gene in this annotation"):
        tokenize(tmp_path / "mismatch", inputs=[{**source, "annotation": str(tmp_path / "other.gff")}],
                 group_shares={"non-human": 1.0})


def test_random_strand_mixes_reverse_complements(ray_cluster, tmp_path):
    source = generated(tmp_path, "strands", (600_000,), seed=50)
    tokenize(tmp_path / "random", inputs=[source], seq_len=1000, strand="random", min_acgt_fraction=0,
             val_fraction=0, group_shares={"non-human": 1.0})
    rows = read_split(tmp_path / "random", "train")
    strands = np.array(rows["strand"].to_pylist())
    assert abs((strands == "-").mean() - 0.56) < 0.07
    (tmp_path / "strands.fa").write_bytes(gzip.decompress(Path(source["url"]).read_bytes()))
    reference = reference_sequence(tmp_path / "strands.fa")["chr1"]
    tokens = tokens_array(rows)
    for row, (start, strand) in enumerate(zip(rows["start"].to_pylist(), strands, strict=True)):
        forward = reverse_complement(tokens[row]) if strand == "-" else tokens[row]
        assert decode(forward) == reference[start : start + 1000]


@pytest.mark.parametrize("case", ERRORS)
def test_malformed_input_fails_the_job_with_no_dataset(ray_cluster, tmp_path, case):
    bad = write_error_case(tmp_path, case)
    inputs = [RCRS, {"url": str(bad), "assembly": "bad", "organism": "x", "group": "human"}]
    with pytest.raises(InputError) as error:
        tokenize(tmp_path / "dataset", inputs=inputs)
    assert str(bad) in str(error.value) and ERRORS[case][0] in str(error.value)
    with pytest.raises(ConfigError, match="not a complete dataset"):
        load_manifest(str(tmp_path / "dataset"))


def test_ncbi_package_with_its_bundled_annotation(ray_cluster, tmp_path):
    accession = "GCF_000000009.1"
    package = tmp_path / f"{accession}.zip"
    with zipfile.ZipFile(package, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"ncbi_dataset/data/{accession}/{accession}_Test_genomic.fna", RCRS_FASTA.read_bytes())
        archive.writestr(f"ncbi_dataset/data/{accession}/genomic.gff", "rCRS\tt\tgene\t3307\t4262\t.\t+\t.\tID=ND1\n")
    spec = {"url": str(package), "assembly": accession, "organism": "Homo sapiens", "group": "human",
            "annotation": "bundled"}
    manifest = tokenize(tmp_path / "ncbi", inputs=[spec], seq_len=1000, gene_flank=0, val_fraction=0)
    rows = read_split(tmp_path / "ncbi", "train")
    assert rows["start"].to_pylist() == [3000, 4000]  # the windows overlapping ND1 (rCRS 3307-4262)
    assert manifest.inputs[0].annotation == "bundled"


@pytest.mark.services
def test_gcs_input_through_a_storage_rule(ray_cluster, gcs_server, tmp_path):
    """gs:// reaches gcsfs with the rule's endpoint and anonymous access, in the Ray tasks too."""
    fs = gcs_server.filesystem()
    fs.mkdir("genomes")
    fs.put(str(RCRS_FASTA), "genomes/rCRS.fasta")
    settings = {"seq_len": 1000, "strand": "forward", "val_fraction": 0, "group_shares": {"human": 1.0}}
    rule = {"prefix": "gs://genomes/", "endpoint_url": gcs_server.endpoint_url, "anon": True}
    remote = run(TokenizeConfig(inputs=[{**RCRS, "url": "gs://genomes/rCRS.fasta"}], output=str(tmp_path / "gs"),
                                storage=[rule], **settings))
    local = run(TokenizeConfig(inputs=[RCRS], output=str(tmp_path / "local"), **settings))
    assert remote.inputs[0].url == "gs://genomes/rCRS.fasta" and remote.totals == local.totals
    assert read_split(tmp_path / "gs", "train").equals(read_split(tmp_path / "local", "train"))


@pytest.mark.services
def test_s3_inputs_and_output_round_trip(ray_cluster, s3_server, tmp_path):
    bucket = s3_server.make_bucket("tokenize-test")
    fs = s3_server.filesystem()
    fs.put(str(RCRS_FASTA), f"{bucket}/inputs/rCRS.fasta")
    primate = genomes.DATA_DIR / "generated-primate-a.fa.gz"
    fs.put(str(primate), f"{bucket}/inputs/primate-a.fa.gz")
    inputs = [{**RCRS, "url": f"s3://{bucket}/inputs/rCRS.fasta"},
              {"url": f"s3://{bucket}/inputs/primate-a.fa.gz", "assembly": "generated-primate-a",
               "organism": "Generated primate-like genome A (synthetic)", "group": "non-human"}]
    settings = {"seq_len": 1024, "strand": "random", "val_fraction": 0.1,
                "group_shares": {"human": 0.5, "non-human": 0.5}}
    storage_rule = {"prefix": f"s3://{bucket}/", "endpoint_url": s3_server.endpoint_url}
    manifest = run(TokenizeConfig(inputs=inputs, output=f"s3://{bucket}/datasets/q", storage=[storage_rule],
                                  **settings))
    assert fs.exists(f"{bucket}/datasets/q/manifest.json")

    # Read back with pyarrow straight from the bucket, and compare with the same job run locally.
    local_inputs = [RCRS, {**inputs[1], "url": str(primate)}]
    run(TokenizeConfig(inputs=local_inputs, output=str(tmp_path / "local"), **settings))
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    assert load_manifest(f"s3://{bucket}/datasets/q", options).shards == manifest.shards
    for shard in manifest.shards:
        remote = pq.read_table(f"{bucket}/datasets/q/{shard.path}", filesystem=fs)
        assert remote.equals(pq.read_table(tmp_path / "local" / shard.path))
        assert fs.cat_file(f"{bucket}/datasets/q/{shard.path}") == (tmp_path / "local" / shard.path).read_bytes()
    assert "secret" not in fs.cat_file(f"{bucket}/datasets/q/manifest.json").decode()
