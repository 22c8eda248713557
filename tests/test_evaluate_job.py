"""jobs.evaluate end to end on real parts: a local Ray cluster (Ray Data's actor pool), an MLflow server over
HTTP (registry, runs, artifacts), Parquet outputs on disk, and the job's own command line.

The models here are exported GengramLM directories with seeded random weights ("exported", not trained:
what is tested is the platform, which treats them exactly as a pretraining export). The tasks are
semi-synthetic: real JASPAR profiles planted in windows of a generated genome (jobs/assemblies/data/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

from jobs.common import tracking
from jobs.common.config import build_config
from jobs.common.errors import BadInput
from jobs.common.registry import log_gengram_model
from jobs.evaluate import EvaluateConfig, read_results, run
from jobs.evaluate.sources import load_task
from model import GengramLM, exported, flavour
from model.vocab import encode

GENERATED = ROOT / "jobs" / "assemblies" / "data" / "generated-primate-a.fa.gz"
CONTEXT = 256

pytestmark = [pytest.mark.ray, pytest.mark.services]


def export_random_model(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = flavour("debug", max_seq_len=CONTEXT)
    exported.write(directory, GengramLM(config).state_dict(), config)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("export") / "final_model", seed=7)


def ctcf_task(per_class: int = 120, seed: int = 0) -> dict:
    # CTCF's 15 bp profile, four sites per window: a k-mer spectrum sees it (one TBP site does not: see
    # JasparSource), so it is the positive control of the pipeline.
    return {"name": "ctcf", "source": {"type": "jaspar", "motif": "MA0139", "sites": 4, "length": 160,
                                       "per_class": per_class, "seed": seed,
                                       "background": {"fasta": str(GENERATED)}}}


def shuffled_labels_task(directory: Path, examples: int = 600) -> dict:
    """The negative control: real sequences of the generated genome, labels drawn independently of them."""
    rng = np.random.default_rng(3)
    genome = "".join(line.strip() for line in _generated_lines() if not line.startswith(">"))
    starts = rng.integers(0, len(genome) - 160, size=examples)
    sequences = [genome[s : s + 160] for s in starts]
    labels = rng.integers(0, 2, size=examples)
    files = {}
    for split, part in (("train", slice(0, examples // 2)), ("test", slice(examples // 2, None))):
        path = directory / f"{split}.parquet"
        pq.write_table(pa.table({"sequence": sequences[part], "label": labels[part]}), path)
        files[split] = str(path)
    return {"name": "shuffled", "source": {"type": "table", "files": files}}


def _generated_lines() -> list[str]:
    import gzip

    with gzip.open(GENERATED, "rt") as handle:
        return handle.read(400_000).splitlines()[:-1]


def evaluation(tmp_path: Path, mlflow_server, models: list[dict], tasks: list[dict], **sections) -> EvaluateConfig:
    data = {"name": tmp_path.name, "output": str(tmp_path / "evaluation"), "model_cache": str(tmp_path / "cache"),
            "models": models, "tasks": tasks,
            "probes": {"kinds": ["logistic"], "bootstrap": 200},
            "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "test-evaluate"}, **sections}
    return build_config(EvaluateConfig, data)


def mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*.parquet")}


def auroc(results: dict, task: str, model: str, layer=None) -> list[float]:
    return [row["value"] for row in results["metrics"]
            if (row["task"], row["model"], row["split"], row["metric"]) == (task, model, "test", "auroc")
            and (layer is None or row["layer"] == layer)]


def test_probes_with_controls_contract_4_outputs_mlflow_runs_and_reuse(tmp_path, model_dir, mlflow_server, ray_cluster):
    config = evaluation(
        tmp_path, mlflow_server,
        models=[{"name": "exported", "uri": str(model_dir)}, {"name": "kmer", "kind": "kmer"},
                {"name": "untrained", "kind": "random_init", "like": "exported"}],
        tasks=[ctcf_task(), shuffled_labels_task(tmp_path)],
        embedding={"layers": "all", "batch_size": 32},
        interpretability={"analyses": ["write_intensity", "rc_symmetry", "logit_lens"],
                          "sequences": {"task": "ctcf", "max_sequences": 2}})
    first = run(config)
    results = read_results(config.output_url)

    # known answers: the positive control separates, the negative control does not, for every model
    assert min(auroc(results, "ctcf", "kmer")) >= 0.95
    for model in ("exported", "kmer", "untrained"):
        assert all(0.4 <= value <= 0.6 for value in auroc(results, "shuffled", model)), model
    assert len(auroc(results, "ctcf", "exported")) == 4  # one per layer of the debug flavour
    assert all(row["ci_low"] <= row["value"] <= row["ci_high"] for row in results["metrics"])
    assert results["interpretability"]["logit_lens_kl"]["exported"][-1] == 0.0
    assert {row["model"] for row in results["interpretability"]["rc_symmetry"]} == {"exported", "untrained"}
    assert any(row["track"] == "planted site" for row in results["interpretability"]["write_enrichment"])
    assert [t["semi_synthetic"] for t in results["tasks"]] == [True, False]

    # Contract 4: one embeddings file per model x task x split x layer, id / label / fixed-size float32 vectors
    output = Path(config.output_url)
    layer_file = next(output.glob("embeddings/export-*/ctcf-*/test/layer-4.parquet"))
    table = pq.read_table(layer_file)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert table.schema.field("id").type == pa.string() and table.schema.field("label").type == pa.int64()
    assert len(list(output.glob("embeddings/*/*/*/*.parquet"))) == 2 * 2 * (4 + 1 + 4)
    assert "**" in (output / "comparison.md").read_text()

    # MLflow: a parent run, a child per model with its metrics and tags, the plots on the parent
    client = MlflowClient(mlflow_server.tracking_uri)
    parent = client.get_run(first.run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first.run_id}'")
    by_name = {child.info.run_name.split("/")[-1]: child for child in children}
    assert sorted(by_name) == ["exported", "kmer", "untrained"]
    assert "ctcf/logistic/layer4/auroc" in by_name["exported"].data.metrics
    assert by_name["kmer"].data.metrics["ctcf/logistic/auroc"] >= 0.95
    assert by_name["exported"].data.tags["gengram.model_uri"] == str(model_dir)
    logged = {artifact.path for artifact in client.list_artifacts(first.run_id)}
    assert {"comparison.md", "comparison.csv", "logit_lens_kl.png", "layers_ctcf_logistic.png"} <= logged
    assert any(path.startswith("ctcf_logistic_") for path in
               (a.path for a in client.list_artifacts(by_name["kmer"].info.run_id)))  # MLflow's own ROC etc.

    # a re-run reuses every embedding and reproduces every figure
    before = mtimes(output)
    second = run(config)
    assert mtimes(output) == before
    assert [(r.task, r.model, r.layer, r.metric, r.value) for r in second.metrics] == \
           [(r.task, r.model, r.layer, r.metric, r.value) for r in first.metrics]


def test_every_model_uri_form_reads_the_same_weights(tmp_path, model_dir, mlflow_server, ray_cluster):
    # logged and registered exactly as a pretraining run does it
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, "test-evaluate", None)
    run_id = client.create_run(experiment_id).info.run_id
    name = f"evaluate-{tmp_path.name}"
    log_gengram_model(mlflow_server.tracking_uri, run_id, model_dir, name)
    client.set_registered_model_alias(name, "champion", "1")
    # the job must name its own store everywhere: a process-wide default elsewhere (here an empty one) is no help
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    models = [{"name": "by-version", "uri": f"models:/{name}/1"},
              {"name": "by-alias", "uri": f"models:/{name}@champion"},
              {"name": "latest", "uri": f"models:/{name}/latest"},
              {"name": "by-run", "uri": f"runs:/{run_id}/model"},
              {"name": "by-directory", "uri": str(model_dir)}]
    config = evaluation(tmp_path, mlflow_server, models, [ctcf_task(per_class=30)])
    run(config)
    results = read_results(config.output_url)
    identities = {m["name"]: m["identity"] for m in results["models"]}
    assert identities["by-version"] == identities["by-alias"] == identities["latest"] == f"registered-{name}-v1"
    assert identities["by-run"].startswith(f"run-{run_id}")
    assert identities["by-directory"].startswith("export-")
    output = Path(config.output_url)
    vectors = {identity: pq.read_table(next(output.glob(f"embeddings/{identity}/ctcf-*/test/layer-4.parquet")))
               for identity in set(identities.values())}
    reference = next(iter(vectors.values()))
    for table in vectors.values():
        assert table["id"].equals(reference["id"])
        np.testing.assert_array_equal(table["embedding"].combine_chunks().values.to_numpy(),
                                      reference["embedding"].combine_chunks().values.to_numpy())


def test_a_sequence_embeds_alike_alone_in_a_batch_and_on_two_actors(model_dir, ray_cluster):
    from jobs.evaluate.embed import EmbeddingRequest, layer_column, run_inference

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=24)
    rows = pa.table({"id": [f"s{i}" for i in range(24)], "label": np.zeros(24, dtype=np.int64),
                     "sequence": ["".join(rng.choice(list("ACGTN"), size=n)) for n in lengths]})
    config = exported.read_config(exported.local(model_dir))
    weights = ray_cluster.put(exported.read_state_dict(exported.local(model_dir)))
    outputs = {}
    for batch_size, actors in ((1, 1), (8, 1), (8, 2)):
        request = EmbeddingRequest(layers=(2, 4), pooling="mean", reverse_complement=False, batch_size=batch_size)
        outputs[(batch_size, actors)] = run_inference(rows, config, weights, 0, request, actors, 1, 0)
    alone = outputs[(1, 1)]
    assert list(alone["id"]) == rows["id"].to_pylist()
    for key, other in outputs.items():
        for layer in (2, 4):
            # batched matmuls may add in another order: equal to float32 rounding, not bit for bit
            np.testing.assert_allclose(other[layer_column(layer)], alone[layer_column(layer)], rtol=0, atol=1e-5,
                                       err_msg=str(key))


def test_zero_shot_score_is_the_difference_of_two_log_likelihoods(tmp_path, model_dir, mlflow_server, ray_cluster):
    rng = np.random.default_rng(5)
    contig = "".join(rng.choice(list("ACGT"), size=3000))
    (tmp_path / "ref.fa").write_text(">chrT\n" + "\n".join(contig[i : i + 60] for i in range(0, 3000, 60)) + "\n")
    positions = rng.integers(200, 2800, size=40)
    alts = ["ACGT"[("ACGT".index(contig[p]) + 1 + int(rng.integers(3))) % 4] for p in positions]
    table = pa.table({"contig": ["chrT"] * 40, "position": positions + 1, "ref": [contig[p] for p in positions],
                      "alt": alts, "label": rng.integers(0, 2, size=40)})
    pq.write_table(table, tmp_path / "variants.parquet")
    task = {"name": "snv", "kind": "variant_effect",
            "source": {"type": "variants", "table": str(tmp_path / "variants.parquet"),
                       "reference": str(tmp_path / "ref.fa"), "window": 101}}
    config = evaluation(tmp_path, mlflow_server, [{"name": "exported", "uri": str(model_dir)}], [task],
                        zero_shot={"reduction": "sum", "embedding_probe": False})
    run(config)
    scores = pq.read_table(next(Path(config.output_url).glob("scores/*/snv-*.parquet"))).to_pandas()

    model = exported.load(exported.local(model_dir))

    def log_likelihood(sequence: str) -> float:
        ids = torch.from_numpy(encode(sequence).astype(np.int64))[None]
        with torch.no_grad():
            log_p = torch.log_softmax(model(ids, compute_loss=False).logits[0, :-1].double(), -1)
        return float(log_p.gather(1, ids[0, 1:, None]).sum())

    windows = load_task("snv", "variant_effect", config.tasks[0].source, []).examples.to_pandas().set_index("id")
    assert len(scores) == 40
    for row in scores.itertuples():
        window = windows.loc[row.id]
        assert window.ref_sequence[window.variant_offset] == contig[positions[int(row.id.split("-")[1])]]
        expected = log_likelihood(window.alt_sequence) - log_likelihood(window.ref_sequence)
        assert row.score == pytest.approx(expected, abs=1e-3)
    results = read_results(config.output_url)
    assert [r["probe"] for r in results["metrics"]] == ["zero_shot"]


@pytest.mark.parametrize(("change", "named"), [
    ({"models": [{"name": "gone", "uri": "runs:/0123456789abcdef0123456789abcdef/model"}]}, "models.gone.uri="),
    ({"models": [{"name": "gone", "uri": "/no/such/final_model"}]}, "no such directory"),
    ({"models": [{"name": "gone", "uri": "models:/no-such-model/1"}]}, "does not resolve"),
    ({"embedding": {"layers": [9]}}, "embedding.layers: layer 9"),
    ({"tasks": [{**ctcf_task(), "source": {**ctcf_task()["source"], "length": 400}}]}, "more than model"),
])
def test_bad_input_fails_before_any_ray_work_in_one_line(tmp_path, model_dir, mlflow_server, change, named):
    import ray

    data = {"models": [{"name": "exported", "uri": str(model_dir)}], "tasks": [ctcf_task(per_class=20)], **change}
    config = evaluation(tmp_path, mlflow_server, data.pop("models"), data.pop("tasks"), **data)
    started = ray.is_initialized()
    with pytest.raises(BadInput) as error:
        run(config)
    assert named in str(error.value) and "\n" not in str(error.value)
    assert ray.is_initialized() == started
    assert not Path(config.output_url).exists()


def test_a_killed_evaluation_rerun_reuses_what_was_finished(tmp_path, model_dir, mlflow_server):
    config = {"name": "killed", "output": str(tmp_path / "evaluation"), "model_cache": str(tmp_path / "cache"),
              "models": [{"name": "exported", "uri": str(model_dir)},
                         {"name": "other", "uri": str(export_random_model(tmp_path / "other", seed=8))}],
              "tasks": [ctcf_task(per_class=40), {**ctcf_task(per_class=400, seed=1), "name": "ctcf-large"}],
              "probes": {"kinds": ["logistic"], "bootstrap": 50},
              "tracking": {"uri": mlflow_server.tracking_uri, "experiment": "test-evaluate"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "jobs.evaluate", "--config", str(tmp_path / "config.yaml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    output = tmp_path / "evaluation"
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    def one_model_done() -> bool:  # both splits of the first model on the small task (embedding.layers: last)
        return any(len(list(d.rglob("*.parquet"))) == 2 for d in output.glob("embeddings/*/ctcf-[0-9a-f]*"))

    deadline = time.monotonic() + 300
    while not one_model_done() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, and with it its Ray cluster, mid-way
    process.wait()
    finished = mtimes(output)
    assert finished and not (output / "results.json").exists()
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {path: stamp for path, stamp in mtimes(output).items() if path in finished} == finished
    results = json.loads((output / "results.json").read_text())
    assert {row["model"] for row in results["metrics"]} == {"exported", "other"}


def frozen(request_changes: dict, max_seq_len: int = 4096):
    """An untrained debug model as an actor holds it, built in this process (no Ray: it has no weights to get)."""
    from jobs.evaluate.embed import EmbeddingRequest, FrozenModel

    request = EmbeddingRequest(**{"layers": (2, 4), "pooling": "mean", "reverse_complement": False,
                                  "batch_size": 4, **request_changes})
    return FrozenModel(flavour("debug", max_seq_len=max_seq_len).to_dict(), [], 3, request)


def test_a_sequence_past_the_context_is_the_length_weighted_mean_of_its_windows():
    from jobs.evaluate.embed import layer_column

    model = frozen({}, max_seq_len=64)
    rng = np.random.default_rng(2)
    sequence = "".join(rng.choice(list("ACGT"), size=160))  # windows of 64, 64 and 32 bases
    whole = model.embed([sequence])
    parts = [model.embed([sequence[start : start + 64]]) for start in (0, 64, 128)]
    for layer in (2, 4):
        key = layer_column(layer)
        expected = (64 * parts[0][key] + 64 * parts[1][key] + 32 * parts[2][key]) / 160
        np.testing.assert_allclose(whole[key], expected, rtol=0, atol=1e-5)
        assert not np.allclose(whole[key], parts[0][key], atol=1e-3)  # the later windows count


def test_reverse_complement_averaging_makes_a_sequence_and_its_reverse_complement_embed_alike():
    from jobs.evaluate.embed import layer_column

    rng = np.random.default_rng(4)
    sequence = "".join(rng.choice(list("ACGT"), size=120))
    opposite = sequence[::-1].translate(str.maketrans("ACGT", "TGCA"))
    averaged, single = frozen({"reverse_complement": True}), frozen({})
    both = averaged.embed([sequence, opposite])
    alone = single.embed([sequence, opposite])
    for layer in (2, 4):
        key = layer_column(layer)
        np.testing.assert_allclose(both[key][0], both[key][1], rtol=0, atol=1e-5)
        np.testing.assert_allclose(both[key][0], (alone[key][0] + alone[key][1]) / 2, rtol=0, atol=1e-5)
        assert not np.allclose(alone[key][0], alone[key][1], atol=1e-3)  # without averaging they differ
