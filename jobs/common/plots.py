"""The plots jobs log to MLflow, drawn alike: headless matplotlib, one saving rule, curves read
back from a run's metric history."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the file-only backend: jobs run headless, on workers and in CI
import matplotlib.pyplot as plt
from mlflow.tracking import MlflowClient

from jobs.common.tracking import metric_history


def save_figure(fig, path: Path) -> Path:
    """Every plot the platform logs is saved alike, and its figure freed (jobs draw many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(client: MlflowClient, run_id: str, keys: Iterable[str], title: str, path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for key in keys:
        steps, values = metric_history(client, run_id, key)
        if steps:
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_expert_load(client: MlflowClient, run_id: str, layers: list[int], num_experts: int,
                     path: Path) -> Path | None:
    """One panel per MoE layer: each expert's share of routed tokens over training."""
    if not layers:
        return None
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers, strict=False):
        for expert in range(num_experts):
            steps, shares = metric_history(client, run_id, f"moe/layer{layer}/expert{expert}_share")
            ax.plot(steps, shares, lw=1)
        ax.axhline(1 / num_experts, color="k", ls="--", lw=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of tokens")
    fig.suptitle("MoE expert load (dashed: uniform)")
    return save_figure(fig, path)
