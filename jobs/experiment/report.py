"""The experiment's report: the paper's claims, each measured with its numbers and given a verdict.

Claims (arXiv 2601.22203), all at equal training tokens, Gengram (`treatment`) against its baseline twin
(`control`), per dataset of the matrix:
- it lowers the validation loss: final val loss, paired by seed (a seed fixes initialisation and data
  order for both), two-sided paired t-test;
- it speeds convergence: the area under the val-loss curve, paired the same way;
- the window has an interior optimum: the sweep's best window is neither its smallest nor its largest,
  by more than the seed-to-seed spread of the final loss;
- MoE load balance is steadier: the coefficient of variation of expert load, mean over layers and over
  the second half of training, paired by seed;
- probe AUROCs rise on motif-driven tasks: treatment above control on every task, beyond the control's
  bootstrap interval on at least one.
A verdict is `reproduced` when the effect has the claimed sign at p < 0.05 (or as stated above), `not
reproduced` when the opposite sign is that clear, else `inconclusive`. The negative control (i.i.d.
bases) holds when every model stays within its tolerance of the val rows' unigram entropy; a model below
that has seen its future, and the report calls it a platform failure.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from scipy import stats

from jobs.common import storage
from jobs.common.plots import plt, save_figure
from jobs.common.tracking import metric_history
from jobs.evaluate import read_results

ALPHA = 0.05
TRAINING_SECOND_HALF = 0.5


def _paired(treatment: list[float], control: list[float]) -> tuple[float, float]:
    """Mean difference treatment - control and the paired t-test's two-sided p (nan below 2 pairs)."""
    diff = np.array(treatment) - np.array(control)
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        return float(diff.mean()), math.nan
    return float(diff.mean()), float(stats.ttest_rel(treatment, control).pvalue)


def _verdict(claim: str, effect: float, p: float, lower_is_claimed: bool, numbers: str) -> str:
    better = effect < 0 if lower_is_claimed else effect > 0
    clear = not math.isnan(p) and p < ALPHA
    outcome = ("reproduced" if better else "not reproduced") if clear else "inconclusive"
    return f"{claim}: {outcome} ({numbers})"


class Runs:
    """Every pretraining run of the matrix, with its curves from MLflow."""

    def __init__(self, records: list[dict[str, Any]], client: MlflowClient):
        self.records = records
        self.client = client
        self.curves = {r["run_id"]: metric_history(client, r["run_id"], "val_loss") for r in records}

    def of(self, dataset: str, variant: str) -> list[dict[str, Any]]:
        return sorted((r for r in self.records if r["dataset"] == dataset and r["variant"] == variant),
                      key=lambda r: r["seed"])

    def final(self, record: dict[str, Any]) -> float:
        return self.curves[record["run_id"]][1][-1]

    def area(self, record: dict[str, Any]) -> float:
        steps, values = self.curves[record["run_id"]]
        return float(np.trapezoid(values, steps) / (steps[-1] - steps[0])) if len(steps) > 1 else values[0]

    def balance(self, record: dict[str, Any]) -> tuple[float, dict[int, tuple[list[int], list[float]]]]:
        layers = {}
        for key in self.client.get_run(record["run_id"]).data.metrics:
            if key.startswith("moe/layer") and key.endswith("/cv"):
                layer = int(key.split("/")[1].removeprefix("layer"))
                layers[layer] = metric_history(self.client, record["run_id"], key)
        late = [v for steps, values in layers.values() for s, v in zip(steps, values, strict=True)
                if s >= TRAINING_SECOND_HALF * steps[-1]]
        return (float(np.mean(late)) if late else math.nan), layers


def write_report(plan, records: dict[str, dict[str, Any]], output: str, client: MlflowClient, run_id: str) -> dict:
    config = plan.config
    section = config.pretrain
    runs = Runs([records[s.name] for s in plan.of_kind("pretrain")], client)
    lines = [f"# Experiment {config.name}", "",
             "Genomes are generated (jobs/tokenize/genomes.py), not real sequence. All comparisons at equal "
             "training tokens; ± is the standard deviation over seeds.", ""]
    verdicts: list[str] = []
    figures: list[Path] = []
    scratch = Path(tempfile.mkdtemp(prefix="gengram-report-"))

    lines += ["## Final validation loss", "", "| dataset | variant | seeds | val loss | unigram entropy |",
              "|---|---|---|---|---|"]
    for dataset in section.datasets:
        for variant in section.variants:
            group = runs.of(dataset, variant)
            finals = [runs.final(r) for r in group]
            floor = np.mean([r["metrics"]["val_unigram_entropy"] for r in group])
            lines.append(f"| {dataset} | {variant} | {len(group)} | {np.mean(finals):.4f} ± {np.std(finals):.4f} "
                         f"| {floor:.4f} |")
    lines.append("")
    figures.append(_loss_curves(runs, section, scratch))

    control_spread = {}
    for dataset in section.datasets:
        if config.negative_control and dataset == config.negative_control.dataset:
            continue
        treated, control = runs.of(dataset, section.treatment), runs.of(dataset, section.control)
        finals_t, finals_c = [runs.final(r) for r in treated], [runs.final(r) for r in control]
        control_spread[dataset] = float(np.std(finals_t + finals_c))
        effect, p = _paired(finals_t, finals_c)
        verdicts.append(_verdict(
            f"[{dataset}] Gengram lowers the val loss", effect, p, True,
            f"{np.mean(finals_t):.4f} ± {np.std(finals_t):.4f} vs {np.mean(finals_c):.4f} ± {np.std(finals_c):.4f}, "
            f"difference {effect:+.4f}, paired t p = {p:.3g}, n = {len(finals_t)}"))
        area_t, area_c = [runs.area(r) for r in treated], [runs.area(r) for r in control]
        effect, p = _paired(area_t, area_c)
        verdicts.append(_verdict(
            f"[{dataset}] Gengram speeds convergence", effect, p, True,
            f"mean val loss over training {np.mean(area_t):.4f} vs {np.mean(area_c):.4f}, "
            f"difference {effect:+.4f}, paired t p = {p:.3g}"))
        balance_t = [runs.balance(r) for r in treated]
        balance_c = [runs.balance(r) for r in control]
        effect, p = _paired([b[0] for b in balance_t], [b[0] for b in balance_c])
        verdicts.append(_verdict(
            f"[{dataset}] Gengram steadies MoE load balance", effect, p, True,
            f"expert-load CV, second half of training, mean over layers: {np.mean([b[0] for b in balance_t]):.3f} "
            f"vs {np.mean([b[0] for b in balance_c]):.3f}, paired t p = {p:.3g}"))
        figures.append(_balance_plot(dataset, section, balance_t, balance_c, scratch))

    for step in plan.of_kind("tune"):
        record = records[step.name]
        verdict, figure, table = _windows(record, control_spread.get(step.facts["dataset"], 0.0), scratch)
        verdicts.append(verdict)
        figures.append(figure)
        lines += ["## Window sweep", "", *table, ""]

    for step in plan.of_kind("evaluate"):
        results = read_results(step.output)
        verdict, table = _probes(results, section)
        verdicts.append(verdict)
        lines += ["## Probes (test AUROC, 95 % bootstrap interval)", "", *table, ""]
        # The treatment's write intensity along the annotated sequences, drawn by the evaluation.
        for key, url in results["files"].items():
            if key.startswith(f"artifacts/writes_{section.treatment}_"):
                figures.append(scratch / key.removeprefix("artifacts/"))
                figures[-1].write_bytes(storage.read_bytes(url))
        lines += [f"Every interpretability plot and number: the evaluation's MLflow run {records[step.name]['run_id']}",
                  ""]

    if config.negative_control:
        verdicts.append(_negative_control(runs, config.negative_control, section))

    lines[4:4] = ["## Verdicts", "", *[f"- {v}" for v in verdicts], ""]
    for figure in figures:
        lines.append(f"![{figure.stem}]({figure.name})")
    (scratch / "report.md").write_text("\n".join(lines) + "\n")
    for path in [scratch / "report.md", *figures]:
        storage.write_bytes(storage.join(output, path.name), path.read_bytes())
        client.log_artifact(run_id, str(path), artifact_path="report")
    for number, verdict in enumerate(verdicts):
        client.set_tag(run_id, f"verdict.{number}", verdict[:5000])
    return {"report": storage.join(output, "report.md"), "verdicts": verdicts}


def _loss_curves(runs: Runs, section, scratch: Path) -> Path:
    fig, axes = plt.subplots(1, len(section.datasets), figsize=(5 * len(section.datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], section.datasets, strict=True):
        for variant in section.variants:
            curves = [runs.curves[r["run_id"]] for r in runs.of(dataset, variant)]
            steps = curves[0][0]
            values = np.array([c[1][: len(steps)] for c in curves])
            ax.plot(steps, values.mean(0), label=variant)
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.25)
        floor = np.mean([r["metrics"]["val_unigram_entropy"] for r in runs.records if r["dataset"] == dataset])
        ax.axhline(floor, color="grey", linestyle=":", label="unigram entropy")
        ax.set(title=f"{dataset}: val loss (band: min-max over seeds)", xlabel="step", ylabel="nats")
        ax.legend()
    return save_figure(fig, scratch / "val_loss_curves.png")


def _balance_plot(dataset: str, section, treated, control, scratch: Path) -> Path:
    layers = sorted(treated[0][1])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.5 * len(layers), 3), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for name, group in ((section.treatment, treated), (section.control, control)):
            steps = group[0][1][layer][0]
            ax.plot(steps, np.mean([g[1][layer][1][: len(steps)] for g in group], axis=0), label=name)
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="CV of expert load")
    axes[0][0].legend()
    fig.suptitle(f"{dataset}: MoE load balance, mean over seeds")
    return save_figure(fig, scratch / f"moe_balance_{dataset}.png")


def _window_label(value: Any) -> str:
    return "none" if value in (None, "none") else str(value)


def _windows(record: dict[str, Any], spread: float, scratch: Path) -> tuple[str, Path, list[str]]:
    points = sorted(((_window_label(t["params"]["window_size"]), t["val_loss"]) for t in record["trials"]
                     if t["val_loss"] is not None), key=lambda p: (p[0] != "none", int(p[0]) if p[0] != "none" else 0))
    sized = [(int(w), v) for w, v in points if w != "none"]
    best = min(sized, key=lambda p: p[1])
    ends = [sized[0], sized[-1]]
    margin = min(v for _, v in ends) - best[1]
    outcome = "not reproduced" if best in ends else "reproduced" if margin > spread else "inconclusive"
    numbers = ", ".join(f"{w} bp {v:.4f}" for w, v in sized)
    none = [v for w, v in points if w == "none"]
    verdict = (f"[windows] the window has an interior optimum: {outcome} (minimum at {best[0]} bp; {numbers}"
               + (f"; no window {none[0]:.4f}" if none else "")
               + (f"; the better end {margin:.4f} above it, seed spread {spread:.4f})" if best not in ends else ")"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([w for w, _ in sized], [v for _, v in sized], marker="o", label="window")
    if none:
        ax.axhline(none[0], color="grey", linestyle="--", label="no window")
    ax.set(title="val loss by Gengram window", xlabel="window (bp)", ylabel="val loss (nats)")
    ax.legend()
    table = ["| window | val loss |", "|---|---|", *[f"| {w} | {v:.4f} |" for w, v in points]]
    return verdict, save_figure(fig, scratch / "window_curve.png"), table


def _probes(results: dict[str, Any], section) -> tuple[str, list[str]]:
    rows = [r for r in results["metrics"] if r["split"] == "test" and r["metric"] == "auroc"
            and r["probe"] != "zero_shot"]
    best_layer: dict[tuple[str, str, str], dict] = {}
    for row in rows:  # per (task, model, probe) the last layer when there are several
        key = (row["task"], row["model"], row["probe"])
        if key not in best_layer or (row["layer"] or 0) > (best_layer[key]["layer"] or 0):
            best_layer[key] = row
    models = sorted({k[1] for k in best_layer})
    by_task: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for (task, model, probe), row in best_layer.items():
        by_task[task, probe][model] = row
    table = ["| task | probe | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    higher, beyond, lower = 0, 0, 0
    for (task, probe), cells in sorted(by_task.items()):
        table.append(f"| {task} | {probe} | " + " | ".join(
            f"{cells[m]['value']:.3f} [{cells[m]['ci_low']:.3f}, {cells[m]['ci_high']:.3f}]" if m in cells else ""
            for m in models) + " |")
        t, c = cells.get(section.treatment), cells.get(section.control)
        if t and c:
            higher += t["value"] > c["value"]
            beyond += t["value"] > c["ci_high"]
            lower += t["value"] < c["ci_low"]
    pairs = sum(1 for cells in by_task.values() if section.treatment in cells and section.control in cells)
    if pairs and higher == pairs and beyond:
        outcome = "reproduced"
    elif lower:
        outcome = "not reproduced"
    else:
        outcome = "inconclusive"
    return (f"[probes] Gengram raises probe AUROC on motif-driven tasks: {outcome} (higher on {higher} of {pairs} "
            f"task-probe pairs, beyond the baseline's interval on {beyond}, below it on {lower})"), table


def _negative_control(runs: Runs, control, section) -> str:
    worst = []
    for variant in section.variants:
        for record in runs.of(control.dataset, variant):
            floor = record["metrics"]["val_unigram_entropy"]
            worst.append((runs.final(record) - floor, variant, record["seed"]))
    gap, variant, seed = min(worst)
    numbers = ", ".join(f"{v} s{s} {g:+.4f}" for g, v, s in sorted(worst, key=lambda w: (w[1], w[2])))
    if gap < -control.tolerance:
        return (f"[negative control] PLATFORM FAILURE: {variant} seed {seed} went {-gap:.4f} nats below the unigram "
                f"entropy of i.i.d. bases, so it sees its future ({numbers})")
    return f"[negative control] holds: no model below the unigram entropy by more than {control.tolerance} ({numbers})"
