"""Embedding throughput of jobs.evaluate: the Ray Data actor pool against a bare PyTorch loop over the same
sequences and model, side by side in one run.

    .venv/bin/python benchmarks/evaluate_throughput.py [--sequences 2048] [--length 512] [--flavour debug]

Targets (issue 11): one actor >= 0.85x the bare loop; two actors >= 1.6x one actor on two cores. Each actor
and the bare loop get one thread per CPU they hold (Ray sets OMP_NUM_THREADS to an actor's num_cpus), so
the comparison is per core. The Ray Data figures include what a user waits for: the pool's start (each
actor builds its model) and the streaming; the bare loop's model is built before its clock starts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import ray
import torch

from jobs.evaluate.embed import EmbeddingRequest, FrozenModel, run_inference
from model import GengramLM, flavour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--flavour", default="debug")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACGT"), size=args.length)) for _ in range(args.sequences)]
    rows = pa.table({"id": [f"s{i}" for i in range(args.sequences)], "label": np.zeros(args.sequences, np.int64),
                     "sequence": sequences})
    config = flavour(args.flavour, max_seq_len=max(args.length, 256))
    torch.manual_seed(0)
    state = GengramLM(config).state_dict()
    request = EmbeddingRequest(layers=(config.num_layers,), pooling="mean", reverse_complement=False,
                               batch_size=args.batch_size)
    tokens = args.sequences * args.length

    def batch(i: int) -> dict[str, np.ndarray]:
        part = rows.slice(i, args.batch_size)
        return {"id": part["id"].to_numpy(zero_copy_only=False), "label": part["label"].to_numpy(),
                "sequence": part["sequence"].to_numpy(zero_copy_only=False)}

    # the bare loop: the callable the actors run, in this process, on one thread, built before the clock starts
    torch.set_num_threads(1)
    bare = FrozenModel(config.to_dict(), [], 0, request)
    bare.model.load_state_dict(state)
    start = time.perf_counter()
    for i in range(0, args.sequences, args.batch_size):
        bare(batch(i))
    bare_rate = tokens / (time.perf_counter() - start)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    weights = ray.put(state)
    rates = {}
    for actors in (1, 2):
        start = time.perf_counter()
        run_inference(rows, config, weights, 0, request, actors, 1, 0)
        rates[actors] = tokens / (time.perf_counter() - start)
    ray.shutdown()

    print(f"\n{args.sequences} sequences x {args.length} bp, flavour {args.flavour}, batch {args.batch_size}\n")
    print(f"{'path':34s} {'tokens/s':>10s} {'ratio':>8s}  target")
    print(f"{'bare PyTorch loop, 1 thread':34s} {bare_rate:10.0f} {1.0:8.2f}")
    print(f"{'Ray Data, 1 actor x 1 CPU':34s} {rates[1]:10.0f} {rates[1] / bare_rate:8.2f}  >= 0.85 x bare")
    print(f"{'Ray Data, 2 actors x 1 CPU':34s} {rates[2]:10.0f} {rates[2] / rates[1]:8.2f}  >= 1.6 x 1 actor")


if __name__ == "__main__":
    main()
