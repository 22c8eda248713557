"""Contract 2 as a user reads it: the snippets ARCHITECTURE.md gives, run as written on a real shard
(the rCRS reference, tokenised here), against the platform's own reader and the FASTA itself."""

from __future__ import annotations

import re

import datasets
import numpy
import pandas
import pyarrow as pa
import pyarrow.parquet
import pytest
from conftest import RCRS_FASTA, ROOT

from jobs.common.dataset import SCHEMA_VERSION, load_manifest, shard_schema, split_paths, tokens_array
from jobs.tokenize import TokenizeConfig, run
from model.vocab import encode

pytestmark = pytest.mark.ray

SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "ARCHITECTURE.md").read_text(), flags=re.S)


@pytest.fixture(scope="module")
def rcrs_shard(ray_cluster, tmp_path_factory):
    output = tmp_path_factory.mktemp("rcrs") / "dataset"
    manifest = run(TokenizeConfig(inputs=[{"url": str(RCRS_FASTA), "assembly": "NC_012920.1",
                                           "organism": "Homo sapiens", "group": "human"}],
                                  output=str(output), seq_len=1000, group_shares={"human": 1.0}, val_fraction=0))
    paths, _ = split_paths(manifest, "train", str(output))
    return manifest, paths[0]


def test_shards_are_schema_version_2_with_tokens_as_fixed_size_binary(rcrs_shard):
    manifest, path = rcrs_shard
    assert manifest.schema_version == SCHEMA_VERSION == 2
    schema = pyarrow.parquet.read_schema(path)
    assert schema.field("tokens").type == pa.binary(1000)
    assert schema.equals(shard_schema(1000))


def test_the_platform_reader_is_a_view_of_the_column(rcrs_shard):
    _, path = rcrs_shard
    table = pyarrow.parquet.read_table(path)
    tokens = tokens_array(table)
    assert tokens.shape == (table.num_rows, 1000) and tokens.dtype == numpy.uint8
    assert not tokens.flags.owndata  # no copy
    # Real sequence: row r is rCRS from its start (forward strand, no reverse complements here).
    sequence = encode("".join(line.strip() for line in RCRS_FASTA.read_text().splitlines()[1:]))
    for row, start in enumerate(table["start"].to_pylist()):
        assert numpy.array_equal(tokens[row], sequence[start : start + 1000])
    sliced = table.slice(3, 4)  # an offset into the column's buffer
    assert numpy.array_equal(tokens_array(sliced), tokens[3:7])


@pytest.mark.parametrize("snippet", SNIPPETS, ids=["pyarrow", "pandas", "datasets"])
def test_documented_snippets_read_the_same_tokens(rcrs_shard, snippet, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    _, path = rcrs_shard
    namespace = {"numpy": numpy, "pandas": pandas, "pyarrow": pyarrow, "datasets": datasets, "path": path}
    exec(snippet, namespace)
    assert numpy.array_equal(namespace["tokens"], tokens_array(pyarrow.parquet.read_table(path)))


def test_every_reader_refuses_a_version_1_dataset(rcrs_shard, tmp_path):
    manifest, _ = rcrs_shard
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_bytes(manifest.model_copy(update={"schema_version": 1}).to_json())
    with pytest.raises(ValueError, match=r"schema version 1.*force=true"):
        load_manifest(str(old))
