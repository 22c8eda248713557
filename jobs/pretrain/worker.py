"""What each Ray Train worker runs: a DeepSpeed engine around GengramLM, fed by its Ray Data shard.

The loop owns nothing Ray-specific beyond `get_context`, `get_dataset_shard`, `get_checkpoint`
and `report`; parallelism (ZeRO, expert parallelism, gradient accumulation) is DeepSpeed's,
configured from outside by `deepspeed_config`.

Collectives: every rank runs the same number of forward passes (MoE all-to-all with
expert parallelism), metric all-reduces and `ray.train.report` calls, at the same steps.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import ray.train
import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from jobs.common.dataset import tokens_array
from jobs.common.ray_session import quiet_libraries
from jobs.common.tracking import log_metrics
from jobs.pretrain.config import PretrainConfig, deepspeed_config, lr_at
from jobs.pretrain.metrics import MetricAccumulator, evaluate
from jobs.pretrain.weights import export_final_model, load_state_dict, local_experts
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


def tokens_tensor(batch: pa.Table) -> torch.Tensor:
    """[rows, seq_len] int64 ids from an Arrow batch of shards (Contract 2): one view of the column's
    bytes, widened once for the embedding lookup."""
    return torch.from_numpy(tokens_array(batch).astype(np.int64))


class TrainStream:
    """Endless micro-batches, epoch after epoch, each epoch reshuffled locally with its own seed.

    Its position (the epoch, and the micro-batches taken in it) goes into every checkpoint, and a resumed
    run skips to it: Ray Data streams cannot be rewound, but an epoch's order is fixed by its seed (the
    pretraining job has Ray Data preserve order), so re-reading and dropping what was already taken gives
    a resumed run the very batches an uninterrupted one trains on.
    """

    def __init__(self, shard, config: PretrainConfig, rank: int, epoch: int = 0, taken: int = 0):
        self.shard, self.config, self.rank = shard, config, rank
        self.epoch, self.taken = epoch, taken

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            produced = 0
            for batch in self.shard.iter_batches(
                batch_size=self.config.train.micro_batch_size,
                batch_format="pyarrow",
                drop_last=True,
                local_shuffle_buffer_size=self.config.data.shuffle_buffer_rows or None,
                local_shuffle_seed=self.config.data.seed + 1000 * self.epoch + self.rank,
            ):
                produced += 1
                if produced <= self.taken:  # taken before the checkpoint this run resumed from
                    continue
                self.taken = produced
                yield tokens_tensor(batch)
            if produced == 0:
                raise RuntimeError(
                    f"worker {self.rank}: the train split gives no full micro-batch of "
                    f"{self.config.train.micro_batch_size} rows; use a larger dataset or a smaller "
                    "train.micro_batch_size"
                )
            self.epoch, self.taken = self.epoch + 1, 0

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}


def rank_slice(rows: np.ndarray, rank: int, world: int, limit: int) -> np.ndarray:
    """This rank's share of the fixed evaluation rows: equal counts on every rank."""
    per_rank = min(limit, len(rows) // world)
    return rows[rank * per_rank : (rank + 1) * per_rank]


def train_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed  # here, not at the top: the driver imports this module and needs no DeepSpeed

    quiet_libraries(loop_config["verbose"])
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

    step, position = 0, {"epoch": 0, "taken": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            step, position = client_state["step"], client_state["stream"][rank]
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
    stream = TrainStream(ray.train.get_dataset_shard("train"), config, rank, **position)
    batches = iter(stream)
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
            report_checkpoint(engine, config, model_config, step, stream.position, report, eval_rows, rank, world)
        elif evaluated:
            # Schedulers (Tune's ASHA) act on every evaluation, not only on checkpoints.
            ray.train.report(report)

    if tracker:
        tracker.close()


def report_checkpoint(engine, config: PretrainConfig, model_config: ModelConfig, step: int, position: dict[str, int],
                      metrics: dict[str, float], eval_rows: torch.Tensor, rank: int, world: int) -> None:
    # Every rank's stream position, gathered so the one client state DeepSpeed saves holds them all.
    positions = [position]
    if world > 1:
        positions = [None] * world
        torch.distributed.all_gather_object(positions, position)
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"step": step, "stream": positions})
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
        self.run_id = loop_config["mlflow_run_id"]
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        self.client = MlflowClient(loop_config["tracking_uri"])
        self.monitor = None
        if loop_config["system_metrics"]:
            self.monitor = SystemMetricsMonitor(self.run_id, node_id=f"rank{rank}-{os.uname().nodename}")
            self.monitor.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def close(self) -> None:
        if self.monitor:
            self.monitor.finish()
