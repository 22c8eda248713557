"""The end of a search (jobs.tune): a table of its trials, val loss against each searched setting
(the shape of the paper's Fig. 2), Optuna's parameter importances and the best configuration as a
pretraining YAML, all logged into the search's MLflow parent run."""


from __future__ import annotations

import csv
import math
import tempfile
import warnings
from pathlib import Path

import optuna
from optuna.visualization.matplotlib import plot_param_importances

from jobs.common.config import config_to_yaml
from jobs.common.plots import plt, save_figure
from jobs.common.tracking import log_metrics
from jobs.tune.config import METRIC
from jobs.tune.plan import TunePlan
from jobs.tune.space import Dimension
from jobs.tune.trials import TrialRow, child_runs, close_trial_run, outcome, outcome_counts


def training_seconds(client, run_id: str) -> float | None:
    """The training loop's wall time (evaluations included), from its metric timestamps: the time
    between the first and the last logged step, scaled up to all steps."""
    points = [(m.step, m.timestamp) for key in ("loss", METRIC) for m in client.get_metric_history(run_id, key)]
    if len(points) < 2:
        return None
    first_step = min(step for step, _ in points)
    last_step = max(step for step, _ in points)
    span = (max(t for _, t in points) - min(t for s, t in points if s == first_step)) / 1000
    return span * last_step / (last_step - first_step) if last_step > first_step else None


def trial_rows(plan: TunePlan, grid, client, experiment_id: str) -> list[TrialRow]:
    """One row per trial: Tune's last result for it, joined with its MLflow run."""
    runs = child_runs(client, experiment_id, plan.parent_run_id)
    rows = []
    for result in grid:
        trial_id = Path(result.path).name  # trial_dirname
        metrics = result.metrics or {}
        run = runs.get(f"{plan.name}-{trial_id}")
        trial_outcome = outcome(metrics, result.error is not None)
        if run is not None:  # again: a stopped trial's actor may have marked its run FAILED as it was ended
            close_trial_run(client, run, trial_id, trial_outcome)
        rows.append(TrialRow(
            trial_id=trial_id, outcome=trial_outcome, params=dict(result.config or {}),
            step=metrics.get("step"), val_loss=metrics.get(METRIC), wall_s=metrics.get("time_total_s"),
            train_s=training_seconds(client, run.info.run_id) if run else None,
            run_id=run.info.run_id if run else None,
        ))
    return rows


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_table(plan: TunePlan, rows: list[TrialRow], directory: Path) -> list[Path]:
    header = ["trial", "outcome", *(dim.name for dim in plan.dims), "step", METRIC, "wall_s", "train_s",
              "overhead_s", "mlflow_run"]
    table = [[row.trial_id, row.outcome, *(row.params.get(dim.name, "") for dim in plan.dims), row.step or "",
              _number(row.val_loss, 4), _number(row.wall_s, 1), _number(row.train_s, 1),
              _number(row.overhead_s, 1), row.run_id or ""]
             for row in sorted(rows, key=lambda row: (row.outcome != "completed", row.val_loss or math.inf))]
    with open(directory / "trials.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *table])
    lines = [f"# Search {plan.name}: {len(rows)} trials of {plan.config.trial.max_steps} steps",
             "", "train_s: the training loop's time (from its MLflow metric timestamps); "
             "overhead_s = wall_s - train_s: start-up, data, final model export and logging.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in line) + " |" for line in table]
    (directory / "trials.md").write_text("\n".join(lines) + "\n")
    return [directory / "trials.csv", directory / "trials.md"]


def plot_val_loss(plan: TunePlan, dim: Dimension, rows: list[TrialRow], path: Path) -> Path | None:
    """val_loss against one setting, like the paper's Fig. 2: every trial that ran the whole
    budget, the best per choice joined; trials ASHA stopped hollow (after fewer steps)."""
    def x(row: TrialRow) -> float:
        sampled = row.params[dim.name]
        return list(dim.choices).index(sampled) if dim.range is None else float(sampled)

    scored = [row for row in rows if row.val_loss is not None and dim.name in row.params]
    if not scored:
        return None
    completed = [row for row in scored if row.outcome == "completed"]
    stopped = [row for row in scored if row.outcome != "completed"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(dim.choices) + 2), 4))
    if completed:
        ax.scatter([x(r) for r in completed], [r.val_loss for r in completed], color="C0", zorder=3,
                   label=f"ran all {plan.config.trial.max_steps} steps")
        best: dict[float, float] = {}
        for row in completed:
            best[x(row)] = min(best.get(x(row), math.inf), row.val_loss)
        ax.plot(sorted(best), [best[key] for key in sorted(best)], color="C0", alpha=0.5)
    if stopped:
        ax.scatter([x(r) for r in stopped], [r.val_loss for r in stopped], facecolors="none", edgecolors="grey",
                   label="stopped early by ASHA (fewer steps)")
    if dim.range is None:
        ax.set_xticks(range(len(dim.choices)), list(dim.choices), rotation=45 if dim.name == "layers" else 0)
    elif dim.range.log:
        ax.set_xscale("log")
    ax.set_xlabel(dim.name)
    ax.set_ylabel(f"{METRIC} after {plan.config.trial.max_steps} steps")
    ax.set_title(f"{plan.name}: {METRIC} vs {dim.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_importances(study: optuna.Study, path: Path) -> Path | None:
    """Optuna's parameter importances (PED-ANOVA by default) over the trials that completed the
    budget; None with fewer than two of them."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_param_importances(study)
    ax.set_title(f"{study.study_name}: importance for {METRIC} ({len(complete)} trials that ran all steps)")
    ax.figure.set_size_inches(7, 0.5 * len(study.best_trial.params) + 2)
    return save_figure(ax.figure, path)


def write_best_config(plan: TunePlan, best: TrialRow, path: Path) -> Path:
    values = ", ".join(f"{name}={value}" for name, value in best.params.items())
    header = [
        f"# Best trial of search {plan.name}: {best.trial_id}, {METRIC} {best.val_loss:.4f} after "
        f"{best.step} steps (MLflow run {best.run_id}).",
        f"# Its values: {values}",
        "# The search's base pretraining config with them, for a full run:",
        f"#   python -m jobs.pretrain --config {path.name}",
    ]
    body = config_to_yaml(plan.best_config(best.params))
    path.write_text("\n".join(header) + "\n" + body)
    return path


def report(plan: TunePlan, grid, client, experiment_id: str) -> tuple[list[TrialRow], TrialRow | None, list[str]]:
    """The trial table, val loss plots, Optuna's importances and the best config, into the parent run."""
    rows = trial_rows(plan, grid, client, experiment_id)
    completed = [row for row in rows if row.outcome == "completed" and row.val_loss is not None]
    best = min(completed, key=lambda row: row.val_loss) if completed else None
    study = optuna.load_study(study_name=plan.name, storage=plan.study_url)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        files = write_table(plan, rows, scratch)
        plots = [plot_val_loss(plan, dim, rows, scratch / f"val_loss_vs_{dim.name}.png") for dim in plan.dims]
        plots.append(plot_importances(study, scratch / "optuna_param_importances.png"))
        if best is not None:
            files.append(write_best_config(plan, best, scratch / "best_config.yaml"))
        for path in files:
            client.log_artifact(plan.parent_run_id, str(path))
        for plot in filter(None, plots):
            client.log_artifact(plan.parent_run_id, str(plot), artifact_path="plots")
        logged = [path.name for path in files] + [f"plots/{plot.name}" for plot in plots if plot]
    counts = outcome_counts(rows)
    log_metrics(client, plan.parent_run_id, {f"trials_{name}": count for name, count in counts.items()}, step=0)
    if best is not None:
        log_metrics(client, plan.parent_run_id, {f"best_{METRIC}": best.val_loss}, step=0)
        client.set_tag(plan.parent_run_id, "tune.best_trial", best.trial_id)
        client.set_tag(plan.parent_run_id, "tune.best_run_id", best.run_id or "")
    return rows, best, logged
