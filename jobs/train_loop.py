"""What each Ray Train worker runs: a DeepSpeed engine around GengramLM, fed by its Ray Data shard.

The loop owns nothing Ray-specific beyond `get_context`, `get_dataset_shard`, `get_checkpoint`
and `report`; parallelism (ZeRO, expert parallelism, gradient accumulation) is DeepSpeed's,
configured from outside by `deepspeed_config`.

Collectives: every rank runs the same number of forward passes (MoE all-to-all with
expert parallelism), metric all-reduces and `ray.train.report` calls, at the same steps.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from jobs.pretrain_config import PretrainConfig, deepspeed_config, lr_at
from model import GengramLM, ModelConfig

CHECKPOINT_TAG = "engine"  # one DeepSpeed tag per Ray checkpoint directory
FINAL_MODEL_DIR = "final_model"
RNG_DIR = "rng"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (not norms), then let DeepSpeed split expert parameters into their
    own groups: expert-parallel gradients are reduced over a different process group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def tokens_tensor(batch: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch["tokens"]).astype(np.int64))


def train_batches(shard, config: PretrainConfig, rank: int, first_epoch: int) -> Iterator[torch.Tensor]:
    """Endless stream of micro-batches; each epoch reshuffles locally with its own seed."""
    epoch = first_epoch
    while True:
        produced = 0
        for batch in shard.iter_batches(
            batch_size=config.train.micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=config.data.shuffle_buffer_rows or None,
            local_shuffle_seed=config.data.seed + 1000 * epoch + rank,
        ):
            produced += 1
            yield tokens_tensor(batch)
        if produced == 0:
            raise RuntimeError(
                f"worker {rank}: the train split gives no full micro-batch of {config.train.micro_batch_size} "
                "rows; use a larger dataset or a smaller train.micro_batch_size"
            )
        epoch += 1


def rank_slice(rows: np.ndarray, rank: int, world: int, limit: int) -> np.ndarray:
    """This rank's share of the fixed evaluation rows: equal counts on every rank."""
    per_rank = min(limit, len(rows) // world)
    return rows[rank * per_rank : (rank + 1) * per_rank]


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
    with torch.no_grad():
        for start in range(0, len(rows), micro_batch_size):
            ids = rows[start : start + micro_batch_size].to(engine.device)
            out = engine(ids)
            kept = (~torch.isin(ids[:, 1:], model.ignored_targets.to(ids.device))).sum()
            totals += torch.tensor([float(out.lm_loss) * float(kept), float(kept)], dtype=torch.float64)
    engine.train()
    if world > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


EXPERT_MARKER = ".deepspeed_experts."


def expert_index(name: str) -> tuple[str, int, str] | None:
    """'layers.0.ffn...deepspeed_experts.3.up_proj.weight' -> (prefix, 3, 'up_proj.weight')."""
    if EXPERT_MARKER not in name:
        return None
    head, tail = name.split(EXPERT_MARKER)
    index, rest = tail.split(".", 1)
    return head, int(index), rest


def local_experts(state: dict[str, torch.Tensor], model_config: ModelConfig, rank: int) -> dict[str, torch.Tensor]:
    """A global (ep_size 1) state dict cut to the experts this rank holds, under local indices.
    DeepSpeed puts consecutive ranks in one expert-parallel group, so the rank's place in its
    group is rank % ep_size."""
    ep_size = model_config.ep_size if model_config.is_moe else 1
    per_rank = model_config.num_experts // ep_size if model_config.is_moe else 0
    first = (rank % ep_size) * per_rank
    local = {}
    for name, tensor in state.items():
        parsed = expert_index(name)
        if parsed is None:
            local[name] = tensor
        elif first <= parsed[1] < first + per_rank:
            head, index, rest = parsed
            local[f"{head}{EXPERT_MARKER}{index - first}.{rest}"] = tensor
    return local


def load_state_dict(model_dir: str, storage_options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.pt of an exported final model, from a local path or any fsspec URL."""
    from jobs.storage import join, open_url

    with open_url(join(model_dir, "model.pt"), "rb", storage_options) as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


def consolidated_state_dict(engine, model_config: ModelConfig, rank: int, world: int) -> dict[str, torch.Tensor] | None:
    """The full fp32 model on rank 0 (None elsewhere), whatever ZeRO stage and expert split.

    DeepSpeed's `safe_get_full_fp32_param` returns the fp32 master weight however the
    optimizer partitions it (a collective: every rank calls it for every parameter). Each
    rank holds num_experts / ep_size experts under local indices; they are renamed to global
    indices and gathered to rank 0.
    """
    from deepspeed.utils import groups, safe_get_full_fp32_param

    local: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    ep_size = model_config.ep_size if model_config.is_moe else 1
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep_size}") if ep_size > 1 else 0
    per_rank = model_config.num_experts // ep_size if model_config.is_moe else 0
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        tensor = (full if full is not None else param.data).detach().float().cpu().clone()
        parsed = expert_index(name)
        if parsed is None:
            local[name] = tensor
        else:
            head, index, rest = parsed
            experts[f"{head}{EXPERT_MARKER}{ep_rank * per_rank + index}.{rest}"] = tensor
    gathered: list[dict[str, torch.Tensor]] | None = [{} for _ in range(world)] if rank == 0 else None
    if world > 1:
        dist.gather_object(experts, gathered, dst=0)
    elif gathered is not None:
        gathered[0] = experts
    if rank != 0:
        return None
    for part in gathered:
        local.update(part)
    return local


def export_final_model(engine, model_config: ModelConfig, reference_ids: torch.Tensor, directory: Path,
                       rank: int, world: int) -> None:
    """Rank 0 writes model.pt (fp32 state dict), model_config.json, and reference.pt: a batch with
    the engine's own logits, so anyone can verify that the export reproduces the trained model."""
    state = consolidated_state_dict(engine, model_config, rank, world)
    engine.eval()
    with torch.no_grad():
        logits = engine(reference_ids.to(engine.device), compute_loss=False).logits.float().cpu()
    engine.train()
    if rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pt")
    (directory / "model_config.json").write_text(json.dumps(model_config.replace(ep_size=1).to_dict(), indent=2))
    torch.save({"input_ids": reference_ids.cpu(), "logits": logits}, directory / "reference.pt")


def train_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed

    config = PretrainConfig.model_validate(loop_config["config"])
    model_config = ModelConfig.from_dict(loop_config["model_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    # Same seed on every rank for the weights (DeepSpeed also broadcasts them), then a
    # per-rank seed for everything stochastic after that.
    seed_everything(config.train.seed)
    model = GengramLM(model_config)
    if config.model.init_from and not ray.train.get_checkpoint():
        # Before deepspeed.initialize: ZeRO copies the weights into its fp32 master partitions.
        state = load_state_dict(config.model.init_from, config.storage_options(config.model.init_from))
        model.load_state_dict(local_experts(state, model_config, rank))
    seed_everything(config.train.seed + 1 + rank)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups(model, config.train.weight_decay),
        config=deepspeed_config(config),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, config.train) / config.train.lr
        ),
    )

    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            step, epoch = client_state["step"], client_state["epoch"] + 1
            rng_file = Path(directory) / RNG_DIR / f"rank{rank}.pt"
            if rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False))
        print(f"[rank {rank}] resumed from step {step}")
    start_step = step

    tracker = RankZeroTracker(loop_config, rank) if rank == 0 else None
    if tracker and start_step:
        tracker.log({"resumed_from_step": start_step}, start_step)
    eval_limit = config.train.eval_batches * config.train.micro_batch_size
    eval_rows = torch.from_numpy(rank_slice(loop_config["eval_rows"], rank, world, eval_limit).astype(np.int64))
    # Data order after a resume: a new epoch with a new shuffle seed, since Ray Data streams
    # cannot be rewound to a position; weights, optimizer, schedule and RNG continue exactly.
    batches = train_batches(ray.train.get_dataset_shard("train"), config, rank, first_epoch=epoch)
    accumulation = config.gradient_accumulation_steps
    metrics_window = MetricAccumulator()
    last_metrics: dict[str, float] = {}

    while step < config.train.max_steps:
        lr = scheduler.get_last_lr()[0]
        for _ in range(accumulation):
            started = time.perf_counter()
            ids = next(batches).to(engine.device)
            fetched = time.perf_counter()
            out = engine(ids)
            engine.backward(out.loss)
            engine.step()
            metrics_window.add(out, ids.numel(), time.perf_counter() - started, fetched - started)
        step += 1
        last_step = step == config.train.max_steps
        if step % config.train.log_every == 0 or last_step:
            metrics = metrics_window.reduce(world)
            metrics["lr"] = lr
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            last_metrics.update(metrics)
            if tracker:
                tracker.log(metrics, step)
                print(f"step {step}/{config.train.max_steps}  loss {metrics['loss']:.4f}  lr {lr:.2e}  "
                      f"{metrics['tokens_per_s']:,.0f} tokens/s", flush=True)
        evaluated = (step % config.train.eval_every == 0 or last_step) and len(eval_rows) > 0
        if evaluated:
            val_loss = evaluate(engine, eval_rows, config.train.micro_batch_size, world)
            last_metrics["val_loss"] = val_loss
            if tracker:
                tracker.log({"val_loss": val_loss}, step)
        report = {**last_metrics, "step": step, "start_step": start_step, "final": last_step}
        if step % config.checkpoint.every == 0 or last_step:
            report_checkpoint(engine, config, model_config, step, epoch, report, eval_rows, rank, world)
        elif evaluated:
            # Schedulers (Tune's ASHA) act on every evaluation, not only on checkpoints.
            ray.train.report(report)

    if tracker:
        tracker.close()


def report_checkpoint(engine, config: PretrainConfig, model_config: ModelConfig, step: int, epoch: int,
                      metrics: dict[str, float], eval_rows: torch.Tensor, rank: int, world: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"step": step, "epoch": epoch})
        (Path(directory) / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), Path(directory) / RNG_DIR / f"rank{rank}.pt")
        if metrics["final"]:
            reference = eval_rows[: config.train.micro_batch_size]
            if not len(reference):
                reference = torch.full((1, 16), 1, dtype=torch.long)
            export_final_model(engine, model_config, reference, Path(directory) / FINAL_MODEL_DIR, rank, world)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


class RankZeroTracker:
    """Rank 0's MLflow link: metrics into the driver's run, plus MLflow system metrics."""

    def __init__(self, loop_config: dict[str, Any], rank: int):
        import mlflow
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        from jobs.tracking import MlflowClient

        self.run_id = loop_config["mlflow_run_id"]
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        self.client = MlflowClient(loop_config["tracking_uri"])
        self.monitor = None
        if loop_config["system_metrics"]:
            self.monitor = SystemMetricsMonitor(self.run_id, node_id=f"rank{rank}-{os.uname().nodename}")
            self.monitor.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from jobs.tracking import log_metrics

        log_metrics(self.client, self.run_id, metrics, step)

    def close(self) -> None:
        if self.monitor:
            self.monitor.finish()
