"""What a training run measures, rank by rank: loss parts, expert load, Gengram gates and
throughput summed over a logging interval and all-reduced in one collective; and the
token-weighted validation loss."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist

from model import GengramLM


class MetricAccumulator:
    """Sums loss parts, expert counts and gate statistics over a logging interval, then
    all-reduces them in one collective."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.expert_counts: dict[int, torch.Tensor] = {}
        self.micro_batches = 0
        self.tokens = 0
        # Seconds spent in training steps only (data wait included; eval and checkpoints not),
        # so tokens_per_s is the training throughput whatever the eval cadence.
        self.busy_seconds = 0.0
        self.data_seconds = 0.0  # of which waiting for the next micro-batch

    def add(self, out, tokens: int, seconds: float, data_seconds: float) -> None:
        self.micro_batches += 1
        self.tokens += tokens
        self.busy_seconds += seconds
        self.data_seconds += data_seconds
        for name in ("loss", "lm_loss", "aux_loss", "z_loss"):
            self.sums[name] += getattr(out, name).detach().item()
        for layer, counts in out.expert_counts.items():
            counts = counts.detach().float().cpu()
            self.expert_counts[layer] = self.expert_counts.get(layer, 0) + counts
        for layer, fraction in out.dropped_fraction.items():  # only when capacity dropping is on
            self.sums[f"moe/layer{layer}/dropped_fraction"] += float(fraction)
        for layer, stats in out.gate_stats.items():
            for name, value in stats.items():
                self.sums[f"gengram/layer{layer}/{name}"] += float(value)

    def reduce(self, world: int) -> dict[str, float]:
        names = sorted(self.sums)
        layers = sorted(self.expert_counts)
        counters = [self.micro_batches, self.tokens, self.busy_seconds, self.data_seconds]
        flat = torch.cat(
            [torch.tensor([self.sums[n] for n in names] + counters, dtype=torch.float64)]
            + [self.expert_counts[layer].double() for layer in layers]
        )
        if world > 1:
            dist.all_reduce(flat)
        micro_batches, tokens, busy, data = flat[len(names) : len(names) + len(counters)].tolist()
        metrics = {name: flat[i].item() / micro_batches for i, name in enumerate(names)}
        # Ranks run concurrently: global throughput is all tokens over the mean busy time.
        metrics["tokens_per_s"] = tokens / (busy / world)
        metrics["data_wait_fraction"] = data / busy  # input-bound when this is not near zero
        offset = len(names) + len(counters)
        for layer in layers:
            counts = flat[offset : offset + len(self.expert_counts[layer])]
            offset += len(counts)
            share = counts / counts.sum().clamp(min=1)
            for expert, value in enumerate(share.tolist()):
                metrics[f"moe/layer{layer}/expert{expert}_share"] = value
            metrics[f"moe/layer{layer}/cv"] = (share.std(unbiased=False) / share.mean()).item()
            metrics[f"moe/layer{layer}/max_over_mean"] = (share.max() / share.mean()).item()
        self.reset()
        return metrics


def evaluate(engine, rows: torch.Tensor, micro_batch_size: int, world: int) -> float:
    """Token-weighted mean LM loss over every rank's evaluation rows."""
    model: GengramLM = engine.module
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), model.dropless_routing():
        for start in range(0, len(rows), micro_batch_size):
            ids = rows[start : start + micro_batch_size].to(engine.device)
            out = engine(ids)
            kept = (~torch.isin(ids[:, 1:], model.ignored_targets.to(ids.device))).sum()
            totals += torch.tensor([float(out.lm_loss) * float(kept), float(kept)], dtype=torch.float64)
    engine.train()
    if world > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()




def unigram_entropy(rows: np.ndarray, ignored_targets: tuple[int, ...]) -> float:
    """Nats per target of a model that knows only how often each token occurs among these rows' targets
    (what the LM loss scores): a val loss has to go below it before a model has learnt more than base
    composition."""
    counts = np.bincount(rows[:, 1:].ravel(), minlength=256).astype(np.float64)
    counts[list(ignored_targets)] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
