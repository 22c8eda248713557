"""jobs.evaluate's probes, metrics and k-mer featuriser: real scikit-learn and XGBoost fits, metrics checked
against scikit-learn, and MLflow's classifier plots logged to a real tracking server."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, average_precision_score, matthews_corrcoef, roc_auc_score
from sklearn.preprocessing import label_binarize

from jobs.common.config import ConfigError, build_config
from jobs.common.errors import BadInput
from jobs.evaluate.kmer import kmer_names, kmer_spectrum
from jobs.evaluate.probes import (
    ProbeInputError,
    ProbesConfig,
    _resample_counts,
    binary_auroc,
    carve_validation,
    classification_metrics,
    evaluate_probes,
    fit_probe,
    log_probe_plots,
)

# Small probes: these tests check behaviour, not the defaults' capacity. One XGBoost thread: the test
# machine's cores are shared, and XGBoost's threads stall each other when one is descheduled.
SMALL = {"mlp": {"hidden_layer_sizes": [32]}, "xgboost": {"n_estimators": 60, "max_depth": 3, "n_jobs": 1},
         "bootstrap": 200}


def small_config(**changes) -> ProbesConfig:
    return build_config(ProbesConfig, {**SMALL, **changes})


def blobs(rng, n: int, n_classes: int = 2, separation: float = 4.0, features: int = 16):
    labels = rng.integers(0, n_classes, n)
    centres = rng.normal(size=(n_classes, features)) * separation
    return (centres[labels] + rng.normal(size=(n, features))).astype(np.float32), labels


def test_config_defaults_and_unknown_keys():
    config = ProbesConfig()
    assert config.kinds == ["logistic", "mlp"] and config.seed == 0 and config.bootstrap == 1000
    assert config.validation_fraction == 0.1
    assert (config.logistic.C, config.logistic.max_iter) == (1.0, 1000)
    assert config.mlp.hidden_layer_sizes == [256] and config.mlp.early_stopping and config.mlp.max_iter == 200
    assert (config.xgboost.n_estimators, config.xgboost.max_depth, config.xgboost.learning_rate) == (300, 6, 0.1)
    with pytest.raises(ConfigError, match=r"mlp\.hidden: unknown key"):
        build_config(ProbesConfig, {"mlp": {"hidden": [8]}})
    with pytest.raises(ConfigError, match="kinds"):
        build_config(ProbesConfig, {"kinds": ["svm"]})
    with pytest.raises(ConfigError, match="'mlp' is listed twice"):
        build_config(ProbesConfig, {"kinds": ["mlp", "logistic", "mlp"]})


# ----------------------------------------------------------------------------- k-mer spectrum


def counted_spectrum(sequence: str, ks) -> list[float]:
    """The spectrum by slicing strings: every k-mer without N, over the number of such positions."""
    row = []
    for k in ks:
        kmers = collections.Counter(sequence[i : i + k] for i in range(len(sequence) - k + 1))
        clean = {kmer: count for kmer, count in kmers.items() if "N" not in kmer}
        positions = sum(clean.values())
        row += [clean.get(name, 0) / positions if positions else 0.0 for name in kmer_names([k])]
    return row


@pytest.mark.parametrize("ks", [(1, 2, 3, 4, 5, 6), (2, 5)])
def test_kmer_spectrum_matches_an_independent_count(ks):
    rng = np.random.default_rng(0)
    sequences = ["ACGTNACGTTTGCA", "", "N", "A", "ACGTAC", "NNNNNNN", "GGGGGGGGG", "TANAAAAANNTATAAAAG",
                 "".join(rng.choice(list("ACGTN"), size=300, p=[0.24, 0.24, 0.24, 0.24, 0.04]))]
    spectrum = kmer_spectrum(sequences, ks)
    assert spectrum.dtype == np.float32 and spectrum.shape == (len(sequences), sum(4**k for k in ks))
    assert len(kmer_names(ks)) == spectrum.shape[1]
    expected = np.array([counted_spectrum(sequence, ks) for sequence in sequences])
    np.testing.assert_allclose(spectrum, expected, rtol=1e-6, atol=1e-7)
    assert kmer_names((1, 2))[:6] == ["A", "C", "G", "T", "AA", "AC"]


def test_kmer_spectrum_of_many_sequences_is_counted_per_sequence():
    """More sequences than one counting block: each row is still its own sequence's spectrum."""
    rng = np.random.default_rng(1)
    sequences = ["".join(rng.choice(list("ACGTN"), size=int(rng.integers(0, 12)))) for _ in range(2500)]
    spectrum = kmer_spectrum(sequences, (1, 3))
    for row in rng.choice(len(sequences), 40, replace=False):
        np.testing.assert_allclose(spectrum[row], counted_spectrum(sequences[row], (1, 3)), rtol=1e-6, atol=1e-7)
    assert kmer_spectrum([], (1, 2)).shape == (0, 20)


# ----------------------------------------------------------------------------- probes


@pytest.mark.parametrize("kind", ["logistic", "mlp", "xgboost"])
def test_each_probe_separates_separable_data(kind):
    X, y = blobs(np.random.default_rng(3), 900)
    X_test, y_test = X[600:], y[600:]
    results = evaluate_probes(small_config(kinds=[kind]), X[:600], y[:600], None, None, X_test, y_test)
    assert [(r.probe, r.split) for r in results] == [(kind, "validation"), (kind, "test")]
    for result in results:
        assert result.metrics["auroc"].value > 0.99, (result.split, result.metrics)
        assert result.probabilities.shape[1] == 2
    test = results[1]
    assert test.probabilities.shape[0] == len(y_test)
    np.testing.assert_allclose(test.estimator.predict_proba(X_test), test.probabilities)


@pytest.mark.parametrize("kind", ["logistic", "mlp", "xgboost"])
def test_shuffled_labels_give_chance_auroc(kind):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(1600, 16)).astype(np.float32)
    y = rng.permutation(np.arange(1600) % 2)
    results = evaluate_probes(small_config(kinds=[kind]), X[:800], y[:800], None, None, X[800:], y[800:])
    test = next(r for r in results if r.split == "test")
    assert 0.4 <= test.metrics["auroc"].value <= 0.6, test.metrics


def test_given_validation_split_is_used_and_xgboost_stops_early_on_it():
    rng = np.random.default_rng(6)
    X, y = blobs(rng, 900, n_classes=3, separation=0.6)
    config = small_config(kinds=["xgboost"], xgboost={"n_estimators": 400, "early_stopping_rounds": 5, "n_jobs": 1})
    results = evaluate_probes(config, X[:500], y[:500], X[500:700], y[500:700], X[700:], y[700:])
    validation, test = results
    assert validation.probabilities.shape == (200, 3) and test.probabilities.shape == (200, 3)
    assert test.estimator[-1].best_iteration < 399  # it stopped before its last round
    assert 0.6 < test.metrics["auroc"].value < 1


def test_carve_validation_is_stratified_and_deterministic():
    y = np.repeat([0, 1, 2, 3], [900, 100, 35, 2])
    np.random.default_rng(7).shuffle(y)
    train, validation = carve_validation(y, 0.1, seed=3)
    again = carve_validation(y, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(validation, again[1])
    assert not np.array_equal(validation, carve_validation(y, 0.1, seed=4)[1])
    assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(len(y)))
    assert np.bincount(y[validation]).tolist() == [90, 10, 4, 1]  # every class, in proportion, at least one
    with pytest.raises(ProbeInputError, match="class 5 has one train example"):
        carve_validation(np.array([0, 0, 0, 5]), 0.1, seed=0)


def test_bad_labels_are_named():
    rng = np.random.default_rng(8)
    X, y = blobs(rng, 200)
    config = small_config(kinds=["logistic"])
    with pytest.raises(BadInput, match=r"train split holds only class 1 .*two classes"):
        evaluate_probes(config, X, np.ones(200, int), None, None, X, y)
    with pytest.raises(ProbeInputError, match="test split has no example of class 0"):
        evaluate_probes(config, X, y, None, None, X[y == 1], y[y == 1])
    with pytest.raises(ProbeInputError, match="test split has label 2"):
        evaluate_probes(config, X, y, None, None, X, np.where(y == 1, 2, 0))
    with pytest.raises(ProbeInputError, match="labels are float64"):
        evaluate_probes(config, X, y.astype(float), None, None, X, y)


# ----------------------------------------------------------------------------- metrics


def scored(rng, n: int, n_classes: int = 2, signal: float = 1.0):
    """Labels and probabilities that lean towards the true class, from rounded logits so that scores tie."""
    y = rng.integers(0, n_classes, n)
    logits = np.round(rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y], 1)
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def sklearn_metrics(y, proba, weights=None):
    predicted = proba.argmax(axis=1)
    if proba.shape[1] == 2:
        auroc = roc_auc_score(y, proba[:, 1], sample_weight=weights)
        auprc = average_precision_score(y, proba[:, 1], sample_weight=weights)
    else:
        auroc = roc_auc_score(y, proba, multi_class="ovr", average="macro", sample_weight=weights)
        auprc = average_precision_score(label_binarize(y, classes=range(proba.shape[1])), proba, average="macro",
                                        sample_weight=weights)
    return {"auroc": auroc, "auprc": auprc, "mcc": matthews_corrcoef(y, predicted, sample_weight=weights),
            "accuracy": accuracy_score(y, predicted, sample_weight=weights)}


@pytest.mark.parametrize("n_classes", [2, 4])
def test_metrics_and_their_intervals_equal_scikit_learns(n_classes):
    y, proba = scored(np.random.default_rng(9), 300, n_classes)
    metrics = classification_metrics(y, proba, seed=1, bootstrap=60)
    for name, expected in sklearn_metrics(y, proba).items():
        assert metrics[name].value == pytest.approx(expected, abs=1e-12), name
    # The same resamples, one scikit-learn call each: the vectorised bootstrap gives the same interval.
    resamples = _resample_counts(y, seed=1, bootstrap=60)[:, 1:].T
    naive = [sklearn_metrics(y, proba, weights) for weights in resamples]
    for name in metrics:
        low, high = np.percentile([m[name] for m in naive], [2.5, 97.5])
        assert (metrics[name].ci_low, metrics[name].ci_high) == pytest.approx((low, high), abs=1e-12), name


def test_interval_contains_the_estimate_and_narrows_with_n():
    widths = {}
    for n in (200, 2000):
        y, proba = scored(np.random.default_rng(10), n)
        metrics = classification_metrics(y, proba, seed=0, bootstrap=500)
        for name, metric in metrics.items():
            assert metric.ci_low <= metric.value <= metric.ci_high, (n, name, metric)
        widths[n] = {name: m.ci_high - m.ci_low for name, m in metrics.items()}
    for name in widths[200]:
        assert widths[2000][name] < 0.6 * widths[200][name], (name, widths)


def test_resamples_keep_every_class():
    y = np.repeat([0, 1, 2], [500, 3, 1])
    counts = _resample_counts(y, seed=0, bootstrap=300)
    per_class = np.stack([counts[y == k].sum(axis=0) for k in range(3)], axis=1)
    assert (per_class == [500, 3, 1]).all()
    metrics = classification_metrics(y, np.eye(3)[np.where(y == 2, 1, y)], seed=0, bootstrap=300)
    assert all(np.isfinite([m.value, m.ci_low, m.ci_high]).all() for m in metrics.values())


def test_binary_auroc_of_zero_shot_scores():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 500)
    scores = y + rng.normal(size=500)
    value = binary_auroc(y, scores, seed=0, bootstrap=300)
    assert value.value == pytest.approx(roc_auc_score(y, scores))
    assert value.ci_low < value.value < value.ci_high
    assert binary_auroc(y, -scores, seed=0, bootstrap=300).value == pytest.approx(1 - value.value)
    with pytest.raises(ProbeInputError, match="NaN"):
        binary_auroc(y, np.where(y == 1, np.nan, scores), seed=0, bootstrap=10)
    with pytest.raises(ProbeInputError, match="no example of class 1"):
        binary_auroc(np.zeros(10, int), scores[:10], seed=0, bootstrap=10)


# ----------------------------------------------------------------------------- MLflow plots


def test_probe_plots_are_mlflows_own_under_a_prefix(mlflow_server, tmp_path):
    rng = np.random.default_rng(12)
    client = MlflowClient(mlflow_server.tracking_uri)
    run_id = client.create_run(client.create_experiment("probe-plots")).info.run_id
    config = small_config(kinds=["logistic", "xgboost"])

    X, y = blobs(rng, 400, separation=0.7)
    binary = fit_probe("logistic", config, X[:300], y[:300], X[300:350], y[300:350])
    log_probe_plots(run_id, "promoter/logistic", binary, X[350:], y[350:], ["no", "yes"],
                    tracking_uri=mlflow_server.tracking_uri)
    binary_auroc_value = roc_auc_score(y[350:], binary.predict_proba(X[350:])[:, 1])
    X, y = blobs(rng, 400, n_classes=3, separation=0.7)
    multi = fit_probe("xgboost", config, X[:300], y[:300], X[300:350], y[300:350])
    log_probe_plots(run_id, "species/xgboost", multi, X[350:], y[350:], ["human", "mouse", "fly"],
                    tracking_uri=mlflow_server.tracking_uri)

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    for prefix in ("promoter_logistic_", "species_xgboost_"):
        plots = ("roc_curve_plot", "precision_recall_curve_plot", "confusion_matrix")
        assert {f"{prefix}{plot}.png" for plot in plots} | {f"{prefix}classes.json"} <= artifacts, sorted(artifacts)
    assert "species_xgboost_per_class_metrics.csv" in artifacts
    classes = client.download_artifacts(run_id, "species_xgboost_classes.json", str(tmp_path))
    assert json.loads(Path(classes).read_text()) == {"0": "human", "1": "mouse", "2": "fly"}
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the caller ends its run, not the plots
    assert run.data.metrics["promoter_logistic_roc_auc"] == pytest.approx(binary_auroc_value)
