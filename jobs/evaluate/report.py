"""What an evaluation shows people: the comparison table (rows tasks and probes, columns models, the best of
each row marked) and the layer sweep (test AUROC per layer, one line per model: the paper's hierarchical
representation), plus whatever plots the interpretability analyses drew."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from jobs.common.plots import save_figure
from jobs.evaluate.outputs import MetricRow
from jobs.evaluate.sources import TaskData

HEADLINE = "auroc"


@dataclass(frozen=True)
class Comparison:
    markdown: str
    csv: str


def _reported(rows: list[MetricRow]) -> dict[tuple[str, str], dict[str, MetricRow]]:
    """(task, probe) -> model -> its test AUROC at the deepest layer it was measured at."""
    table: dict[tuple[str, str], dict[str, MetricRow]] = defaultdict(dict)
    for row in rows:
        if row.split != "test" or row.metric != HEADLINE:
            continue
        cell = table[(row.task, row.probe)]
        held = cell.get(row.model)
        if held is None or (row.layer or 0) > (held.layer or 0):
            cell[row.model] = row
    return table


def comparison_table(rows: list[MetricRow], models: list[str], tasks: list[TaskData]) -> Comparison:
    labels = {t.name: t.name + (" (semi-synthetic)" if t.semi_synthetic else "") for t in tasks}
    table = _reported(rows)
    header = ["task", "probe", *models]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    plain = [[*header, "best"]]
    for (task, probe), cells in sorted(table.items()):
        best = max(cells, key=lambda model: cells[model].value)
        shown, values = [], []
        for model in models:
            row = cells.get(model)
            if row is None:
                shown.append("")
                values.append("")
                continue
            text = f"{row.value:.3f}"
            if row.ci_low is not None:
                text += f" [{row.ci_low:.3f}, {row.ci_high:.3f}]"
            shown.append(f"**{text}**" if model == best else text)
            values.append(f"{row.value:.6f}")
        markdown.append("| " + " | ".join([labels.get(task, task), probe, *shown]) + " |")
        plain.append([labels.get(task, task), probe, *values, best])
    buffer = io.StringIO()
    csv.writer(buffer).writerows(plain)
    note = f"\nTest {HEADLINE.upper()} with its bootstrap 95 % interval; the best of each row in bold.\n"
    return Comparison("\n".join(markdown) + "\n" + note, buffer.getvalue())


def write_tables(comparison: Comparison, directory: Path) -> list[Path]:
    markdown, table = directory / "comparison.md", directory / "comparison.csv"
    markdown.write_text(comparison.markdown)
    table.write_text(comparison.csv)
    return [markdown, table]


def plot_layer_sweep(rows: list[MetricRow], task: str, probe: str, path: Path) -> Path | None:
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if (row.task, row.probe, row.split, row.metric) == (task, probe, "test", HEADLINE) and row.layer is not None:
            curves[row.model].append((row.layer, row.value))
    if not any(len(points) > 1 for points in curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, points in sorted(curves.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"test {HEADLINE.upper()} ({probe} probe)")
    ax.set_title(f"{task}: representation by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def draw_all(rows: list[MetricRow], findings, directory: Path) -> list[Path]:
    drawn = []
    for task, probe in sorted({(r.task, r.probe) for r in rows if r.layer is not None}):
        path = plot_layer_sweep(rows, task, probe, directory / f"layers_{task}_{probe}.png")
        if path is not None:
            drawn.append(path)
    return drawn + findings.plots(directory)
