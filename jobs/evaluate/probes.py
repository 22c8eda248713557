"""Probes on frozen embeddings, and the metrics they are judged by, each with a bootstrap 95 % interval.

A probe is a standardiser then a classifier with fixed hyperparameters (no search: the probe measures the
embedding, not the tuning): logistic regression, an MLP (the paper's main probe) or XGBoost (the paper's
probe for the species tasks). Labels are class indices 0..K-1 and every class must be in every split.

The intervals come from a stratified bootstrap over the scored examples: each resample draws, within
each class, as many examples as the class has (pROC's default for AUROC intervals). So no resample ever
lacks a class and none is redrawn or skipped; the class mix of the split is held fixed. The metrics of all
resamples are computed at once from per-resample example counts (one [examples, resamples] matrix),
not by calling scikit-learn once per resample: the bootstrap runs per task x model x probe x layer.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
from mlflow.tracking import MlflowClient
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from jobs.common.config import StrictModel
from jobs.common.errors import BadInput

ProbeKind = Literal["logistic", "mlp", "xgboost"]
Split = Literal["validation", "test"]
CONFIDENCE = 0.95


class ProbeInputError(BadInput):
    """Features or labels no probe can be fitted or scored on; the message names the split and the class."""


class LogisticSettings(StrictModel):
    C: PositiveFloat = 1.0  # inverse L2 strength, on standardised features
    max_iter: PositiveInt = 1000


class MlpSettings(StrictModel):
    hidden_layer_sizes: list[PositiveInt] = Field(default_factory=lambda: [256], min_length=1)
    alpha: float = Field(1e-4, ge=0)  # L2 penalty
    max_iter: PositiveInt = 200
    # scikit-learn holds out 10 % of the probe's training examples for this (its own split, not ours)
    early_stopping: bool = True


class XgboostSettings(StrictModel):
    n_estimators: PositiveInt = 300
    max_depth: PositiveInt = 6
    learning_rate: PositiveFloat = 0.1
    early_stopping_rounds: PositiveInt = 20  # rounds without a better validation log-loss before stopping
    # Threads; null: every core. Fewer when other work shares the cores: XGBoost's threads wait for each
    # other at every step, so one thread descheduled stalls them all.
    n_jobs: PositiveInt | None = None


class ProbesConfig(StrictModel):
    kinds: list[ProbeKind] = Field(default_factory=lambda: ["logistic", "mlp"], min_length=1)
    seed: int = 0  # probe initialisation, the carved validation split and the bootstrap
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # carved from train when a task has no validation split
    bootstrap: PositiveInt = 1000  # resamples behind each 95 % interval
    logistic: LogisticSettings = Field(default_factory=LogisticSettings)
    mlp: MlpSettings = Field(default_factory=MlpSettings)
    xgboost: XgboostSettings = Field(default_factory=XgboostSettings)

    @field_validator("kinds")
    @classmethod
    def _each_kind_once(cls, kinds: list[ProbeKind]) -> list[ProbeKind]:
        repeated = [kind for kind in kinds if kinds.count(kind) > 1]
        if repeated:
            raise ValueError(f"the probe {repeated[0]!r} is listed twice")
        return kinds


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class ProbeResult:
    probe: ProbeKind
    split: Split
    metrics: dict[str, MetricValue]  # auroc, auprc, mcc, accuracy
    probabilities: np.ndarray  # [examples of the split, classes], for plots
    estimator: Pipeline  # the fitted probe, the same object for both splits


# ----------------------------------------------------------------------------- fitting


def _classifier(kind: ProbeKind, config: ProbesConfig):
    if kind == "logistic":
        return LogisticRegression(C=config.logistic.C, max_iter=config.logistic.max_iter, random_state=config.seed)
    if kind == "mlp":
        mlp = config.mlp
        return MLPClassifier(hidden_layer_sizes=tuple(mlp.hidden_layer_sizes), alpha=mlp.alpha, max_iter=mlp.max_iter,
                             early_stopping=mlp.early_stopping, random_state=config.seed)
    xgb = config.xgboost
    return XGBClassifier(n_estimators=xgb.n_estimators, max_depth=xgb.max_depth, learning_rate=xgb.learning_rate,
                         early_stopping_rounds=xgb.early_stopping_rounds, n_jobs=xgb.n_jobs, random_state=config.seed)


def fit_probe(kind: ProbeKind, config: ProbesConfig, X_train: np.ndarray, y_train: np.ndarray,
              X_val: np.ndarray, y_val: np.ndarray) -> Pipeline:
    """A fitted standardiser + classifier; XGBoost stops early on the validation split."""
    # The scaler is fitted first, not inside Pipeline.fit, because XGBoost's validation set must be
    # standardised with it too; a Pipeline of fitted steps predicts as one fitted as a whole.
    scaler = StandardScaler().fit(X_train)
    classifier = _classifier(kind, config)
    options = {"eval_set": [(scaler.transform(X_val), y_val)], "verbose": False} if kind == "xgboost" else {}
    classifier.fit(scaler.transform(X_train), y_train, **options)
    return Pipeline([("standardise", scaler), ("probe", classifier)])


def carve_validation(y_train: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), sorted: `fraction` of each class, rounded, but at least one
    example of every class on each side, so that both splits can be scored."""
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(y_train):
        members = rng.permutation(np.flatnonzero(y_train == label))
        if len(members) < 2:
            raise ProbeInputError(f"class {label} has one train example: too few to carve a validation split from")
        held_out = min(max(1, round(fraction * len(members))), len(members) - 1)
        validation.append(members[:held_out])
        train.append(members[held_out:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))


def _check_split(split: str, X: np.ndarray, y: np.ndarray, n_classes: int) -> None:
    if X.ndim != 2 or len(X) != len(y):
        raise ProbeInputError(f"the {split} split has features of shape {X.shape} for {len(y)} labels")
    _check_labels(split, y, n_classes)


def _check_labels(split: str, y: np.ndarray, n_classes: int) -> None:
    if not np.issubdtype(y.dtype, np.integer):
        raise ProbeInputError(f"the {split} split's labels are {y.dtype}, not class indices 0..K-1")
    outside = sorted(set(np.unique(y).tolist()) - set(range(n_classes)))
    if outside:
        raise ProbeInputError(f"the {split} split has label {outside[0]}, outside the classes 0..{n_classes - 1}")
    counts = np.bincount(y, minlength=n_classes)
    if (counts == 0).any():
        raise ProbeInputError(f"the {split} split has no example of class {int(np.argmin(counts))}")


def evaluate_probes(config: ProbesConfig, X_train: np.ndarray, y_train: np.ndarray,
                    X_val: np.ndarray | None, y_val: np.ndarray | None,
                    X_test: np.ndarray, y_test: np.ndarray) -> list[ProbeResult]:
    """Every probe of `config` fitted on train and scored on validation and test (in that order per probe).
    Without a validation split, one is carved from train (`config.validation_fraction`, stratified)."""
    X_train, y_train = np.asarray(X_train), np.asarray(y_train)
    classes = np.unique(y_train)
    if len(classes) < 2:
        held = f"only class {classes[0]}" if len(classes) else "no example"
        raise ProbeInputError(f"the train split holds {held} ({len(y_train)} examples): a probe needs two classes")
    n_classes = int(classes.max()) + 1
    if (X_val is None) != (y_val is None):
        raise ProbeInputError("a validation split needs both features and labels")
    _check_split("train", X_train, y_train, n_classes)
    if X_val is None:
        kept, held_out = carve_validation(y_train, config.validation_fraction, config.seed)
        X_train, y_train, X_val, y_val = X_train[kept], y_train[kept], X_train[held_out], y_train[held_out]
    scored = {"validation": (np.asarray(X_val), np.asarray(y_val)), "test": (np.asarray(X_test), np.asarray(y_test))}
    for split, (X, y) in scored.items():
        _check_split(split, X, y, n_classes)

    results = []
    for kind in config.kinds:
        estimator = fit_probe(kind, config, X_train, y_train, *scored["validation"])
        for split, (X, y) in scored.items():
            probabilities = estimator.predict_proba(X)
            metrics = classification_metrics(y, probabilities, config.seed, config.bootstrap)
            results.append(ProbeResult(kind, split, metrics, probabilities, estimator))
    return results


# ----------------------------------------------------------------------------- metrics


def _resample_counts(y: np.ndarray, seed: int, bootstrap: int) -> np.ndarray:
    """float [n, 1 + bootstrap]: how often each example is drawn in each resample. Column 0 is the sample
    itself (every count 1), so point estimates and resamples share one code path. Examples are rows:
    sorting them and summing over them then moves whole contiguous rows."""
    rng = np.random.default_rng(seed)
    n = len(y)
    draws = np.concatenate([members[rng.integers(0, len(members), size=(bootstrap, len(members)))]
                            for members in (np.flatnonzero(y == label) for label in np.unique(y))], axis=1)
    flat = (draws * bootstrap + np.arange(bootstrap)[:, None]).ravel()
    resampled = np.bincount(flat, minlength=n * bootstrap).reshape(n, bootstrap)
    return np.hstack([np.ones((n, 1)), resampled])


def _ranking_metrics(positive: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample: AUROC, the weighted share of (positive, negative) pairs the scores order right (ties
    count half), and scikit-learn's average precision, the precision at each positive's score taken as the
    threshold, averaged over the positives. Both come from where each positive falls among the sorted
    scores of the positives and of the negatives, and running sums of their counts."""

    def sorted_with_running_counts(rows):
        order = np.argsort(scores[rows], kind="stable")
        running = np.zeros((len(order) + 1, counts.shape[1]))  # running[j]: counts of the j lowest scores
        np.cumsum(counts[rows][order], axis=0, out=running[1:])
        return scores[rows][order], running

    negative_scores, negatives_up_to = sorted_with_running_counts(~positive)
    positive_scores, positives_up_to = sorted_with_running_counts(positive)
    at, drawn = scores[positive], counts[positive]
    all_positives, all_negatives = positives_up_to[-1], negatives_up_to[-1]

    negatives_below = negatives_up_to[np.searchsorted(negative_scores, at, "left")]
    negatives_tied = negatives_up_to[np.searchsorted(negative_scores, at, "right")] - negatives_below
    auroc = (drawn * (negatives_below + 0.5 * negatives_tied)).sum(axis=0) / (all_positives * all_negatives)

    true_positives = all_positives - positives_up_to[np.searchsorted(positive_scores, at, "left")]
    called_positive = true_positives + all_negatives - negatives_below
    # A positive not drawn in a resample has weight 0 there, whatever its precision (maybe 0/0).
    precision = np.divide(true_positives, called_positive, out=np.zeros_like(true_positives),
                          where=called_positive > 0)
    average_precision = (drawn * precision).sum(axis=0) / all_positives
    return auroc, average_precision


def _mcc_and_accuracy(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From [true, predicted, resamples] counts: Gorodkin's multi-class MCC (0 when undefined, as
    scikit-learn) and accuracy."""
    total = confusion.sum(axis=(0, 1))
    correct = np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    covariance = correct * total - (true_counts * predicted_counts).sum(axis=0)
    scale = np.sqrt((total**2 - (predicted_counts**2).sum(axis=0)) * (total**2 - (true_counts**2).sum(axis=0)))
    mcc = np.divide(covariance, scale, out=np.zeros_like(covariance), where=scale > 0)
    return mcc, correct / total


def _with_interval(values: np.ndarray) -> MetricValue:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values[1:], [tail, 100 - tail])
    return MetricValue(float(values[0]), float(low), float(high))


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, seed: int, bootstrap: int) -> dict[str, MetricValue]:
    """auroc and auprc (binary: of class 1's probability; more classes: one-vs-rest, macro-averaged),
    mcc and accuracy (of the most probable class), each with its bootstrap 95 % interval."""
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    n_classes = proba.shape[1]
    _check_labels("scored", y_true, n_classes)
    counts = _resample_counts(y_true, seed, bootstrap)
    ranked = [_ranking_metrics(y_true == k, proba[:, k], counts) for k in ([1] if n_classes == 2 else range(n_classes))]
    auroc, auprc = np.mean(ranked, axis=0)
    cell = y_true * n_classes + proba.argmax(axis=1)
    confusion = (np.eye(n_classes**2)[cell].T @ counts).reshape(n_classes, n_classes, -1)
    mcc, accuracy = _mcc_and_accuracy(confusion)
    return {name: _with_interval(values)
            for name, values in (("auroc", auroc), ("auprc", auprc), ("mcc", mcc), ("accuracy", accuracy))}


def binary_auroc(y_true: np.ndarray, scores: np.ndarray, seed: int, bootstrap: int) -> MetricValue:
    """AUROC of zero-shot scores (higher: label 1 more likely), with its bootstrap 95 % interval."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    _check_labels("scored", y_true, 2)
    if not np.isfinite(scores).all():
        raise ProbeInputError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    auroc, _ = _ranking_metrics(y_true == 1, scores, _resample_counts(y_true, seed, bootstrap))
    return _with_interval(auroc)


# ----------------------------------------------------------------------------- plots


# What MLflow and scikit-learn say on every probe plotted that is no news here: that pickle runs code on
# load (this pickle never leaves this process), that integer labels may not be a classifier's (they are
# class indices), and that the features arrive with column names (MLflow hands the probe a DataFrame).
FALSE_ALARMS = ("Saving scikit-learn models in the pickle", "According to the evaluation dataset label values")
ALARMING_LOGGERS = ("mlflow.sklearn", "mlflow.models.evaluation.evaluators.classifier")


def _no_false_alarm(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(FALSE_ALARMS)


@contextmanager
def _without_false_alarms():
    loggers = [logging.getLogger(name) for name in ALARMING_LOGGERS]
    for logger in loggers:
        logger.addFilter(_no_false_alarm)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X has feature names", category=UserWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(_no_false_alarm)


def log_probe_plots(run_id: str, name: str, estimator: Pipeline, X_test: np.ndarray, y_test: np.ndarray,
                    class_names: list[str], *, tracking_uri: str) -> None:
    """MLflow's own classifier plots of a fitted probe on the test split (ROC, precision-recall,
    confusion matrix; lift and calibration too), logged into `run_id`.

    Every artifact is named `<name>_<plot>.png` with the slashes of `name` as `_` (e.g. `promoter_mlp_
    roc_curve_plot.png`): MLflow writes these at the run's root, joining the prefix to the file name, so
    a prefix cannot be a folder. MLflow also logs its own metrics, under the same prefix. MLflow's
    evaluate logs through the process's active run, so this sets the process's tracking URI.
    """
    # mlflow.models.evaluate draws ROC and PR curves only from probabilities, and it takes them only from
    # a model it loaded with the sklearn (or xgboost) flavour, whose raw model's predict_proba it calls:
    # a static dataset of predictions, or a plain function, gives it none. The lightest such model is
    # the pipeline saved to a temporary directory and loaded back, nothing uploaded. Pickle, not MLflow's
    # default skops: skops refuses to save XGBoost's classes unless each is listed as trusted, and its
    # import alone takes seconds.
    prefix = name.replace("/", "_") + "_"
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory() as directory, _without_false_alarms():
        saved = str(Path(directory) / "probe")
        mlflow.sklearn.save_model(estimator, saved, serialization_format="pickle", pip_requirements=[])
        model = mlflow.pyfunc.load_model(saved)
        with mlflow.start_run(run_id=run_id):
            result = mlflow.models.evaluate(
                model, X_test, targets=y_test, model_type="classifier", evaluators="classifier",
                evaluator_config={"metric_prefix": prefix, "label_list": list(range(len(class_names)))})
            # MLflow's plots label classes by index: the names beside them say which is which.
            mlflow.log_dict(dict(enumerate(class_names)), f"{prefix}classes.json")
            per_class = result.artifacts.get("per_class_metrics")
            if per_class is not None:  # a multi-class table MLflow writes without the prefix, so the last one wins
                mlflow.log_text(per_class.content.to_csv(index=False), f"{prefix}per_class_metrics.csv")
    # Leaving start_run's block ends the run; the caller, not this function, decides when it is over.
    client.update_run(run_id, status=status)
