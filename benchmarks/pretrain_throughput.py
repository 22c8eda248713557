"""Pretraining throughput of the debug flavour at seq_len 1024, side by side:

  (a) a bare single-process PyTorch loop: same model, batch and optimiser (AdamW), in-memory tensors
  (b) the platform: jobs.pretrain with one Ray Train worker (DeepSpeed ZeRO-2), streaming the shards
  (c) the platform with two workers (expert parallelism 2, as the quickstart)
  (d) step time with Gengram / step time of the baseline twin, in the bare loop
  (e) step time of the debug flavour with 8 experts, dropless routing (the default) and with
      capacity-based dropping at capacity factor 1.0, in the bare loop

Targets: (b) >= 0.85 x (a); (d) <= 1.10; (b)'s data_wait_fraction <= 1 %.

    .venv/bin/python benchmarks/pretrain_throughput.py [--steps 30] [--rounds 2]

(a) runs while the Ray cluster that (b) and (c) use is up and idle, so that all cases share the
machine as it is; on two cores Ray's own processes cost a few per cent, so (a) is also printed as
measured before Ray started. (b) and (c) take tokens/s from the job's own `tokens_per_s` metric
(time in training steps, data waits included; start-up, evaluation and checkpoints excluded),
median over the logged intervals after the first. (b) gives its one worker both cores, as (a) has them; in (c) each
worker has one. Everything runs on this machine's CPU; a scratch directory holds the dataset,
checkpoints and MLflow store.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from jobs.common.config import load_config
from jobs.common.ray_session import ensure_ray
from jobs.pretrain import run
from jobs.pretrain.config import PretrainConfig
from jobs.tokenize import TokenizeConfig
from jobs.tokenize import run as tokenize
from model import GengramLM, flavour

ROOT = Path(__file__).resolve().parents[1]

SEQ_LEN = 1024
MICRO_BATCH = 4


def bare_loop(flavour_name: str, steps: int, warmup: int = 3, **overrides) -> float:
    """Seconds per optimiser step of a plain PyTorch loop (median over `steps`)."""
    torch.manual_seed(0)
    model = GengramLM(flavour(flavour_name, **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batch = torch.randint(1, 6, (MICRO_BATCH, SEQ_LEN))
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss = model(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def platform_tokens_per_s(dataset: str, scratch: Path, workers: int, steps: int, round_: int) -> tuple[float, float]:
    """(tokens/s, data_wait_fraction) of a platform run, medians over the logged intervals after the first."""
    name = f"bench-{workers}w-{round_}"
    overrides = [
        f"run_name={name}", f"data.dataset={dataset}", f"checkpoint.storage={scratch / 'checkpoints'}",
        f"tracking.uri=sqlite:///{scratch / 'mlflow.db'}", f"tracking.artifact_root={scratch / 'artifacts'}",
        "tracking.registered_model=null", "tracking.system_metrics=false",
        f"train.max_steps={steps}", "train.log_every=5", f"train.eval_every={steps}", f"checkpoint.every={steps}",
        f"train.micro_batch_size={MICRO_BATCH}", f"train.global_batch_size={MICRO_BATCH * workers}",
        f"resources.num_workers={workers}", f"resources.cpus_per_worker={2 // workers}",
        f"model.overrides.ep_size={workers}",
    ]
    result = run(load_config(PretrainConfig, str(ROOT / "jobs/configs/pretrain-quickstart.yaml"), overrides))
    client = MlflowClient(result.tracking_uri)

    def median_after_warmup(key: str) -> float:
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        return statistics.median(m.value for m in history[1:])  # first interval: warm-up

    return median_after_warmup("tokens_per_s"), median_after_warmup("data_wait_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="(a), (b) and (d) are measured this many times, in turn")
    args = parser.parse_args()

    tokens_per_step = MICRO_BATCH * SEQ_LEN
    alone = tokens_per_step / bare_loop("debug", args.steps)  # before Ray exists on the machine
    bare, one, waits, ratios, dropless, dropping = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as scratch:
        scratch = Path(scratch)
        dataset = str(scratch / "quickstart")
        ensure_ray(local_num_cpus=3)  # 2 for the training workers, 1 for Ray Data's reads
        tokenize(load_config(TokenizeConfig, str(ROOT / "jobs/configs/tokenize-quickstart.yaml"),
                             [f"output={dataset}", f"assemblies={ROOT / 'jobs/assemblies/quickstart.yaml'}"]))
        # This VM's speed drifts by ~10 % over minutes: alternate the cases and take medians.
        for round_ in range(args.rounds):
            gengram_step = bare_loop("debug", args.steps)
            ratios.append(gengram_step / bare_loop("baseline-debug", args.steps))
            bare.append(tokens_per_step / gengram_step)
            rate, wait = platform_tokens_per_s(dataset, scratch, 1, args.steps, round_)
            one.append(rate)
            waits.append(wait)
            dropless.append(bare_loop("debug", args.steps, num_experts=8))
            dropping.append(bare_loop("debug", args.steps, num_experts=8, drop_tokens=True, capacity_factor=1.0))
        two, _ = platform_tokens_per_s(dataset, scratch, 2, args.steps, 0)

    def spread(values: list[float], digits: str = ",.0f") -> str:
        return f"({min(values):{digits}}-{max(values):{digits}})" if len(values) > 1 else ""

    a, b, d = statistics.median(bare), statistics.median(one), statistics.median(ratios)
    print()
    print(f"debug flavour, seq_len {SEQ_LEN}, micro batch {MICRO_BATCH}, fp32, {torch.get_num_threads()} threads; "
          f"medians of {args.rounds} rounds of {args.steps} steps")
    print(f"{'case':<58}{'tokens/s':>10}{'vs (a)':>8}")
    print(f"{'(a) bare PyTorch loop, 1 process':<58}{a:>10,.0f}{1:>8.2f}  {spread(bare)}")
    print(f"{'    the same, before any Ray process ran on the machine':<58}{alone:>10,.0f}{alone / a:>8.2f}")
    print(f"{'(b) platform, 1 Ray Train worker (2 CPUs)':<58}{b:>10,.0f}{b / a:>8.2f}  {spread(one)}"
          f"  target >= 0.85 (vs the Ray-free (a): {b / alone:.2f})")
    print(f"{'(c) platform, 2 workers (1 CPU each, ep 2)':<58}{two:>10,.0f}{two / a:>8.2f}")
    print(f"    (b)'s data_wait_fraction: {statistics.median(waits):.2%}  target <= 1 %")
    print(f"(d) step time Gengram / baseline twin: {d:.2f}  {spread(ratios, '.2f')}  target <= 1.10")
    e_free, e_drop = statistics.median(dropless), statistics.median(dropping)
    print(f"(e) 8 experts, step time: dropless {e_free * 1e3:,.0f} ms, capacity 1.0 with dropping "
          f"{e_drop * 1e3:,.0f} ms ({e_free / e_drop:.2f}x)")


if __name__ == "__main__":
    main()
