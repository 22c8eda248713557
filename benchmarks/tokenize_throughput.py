"""Tokenisation throughput: single-core gunzip against the tokenize job with one and two workers.

    python benchmarks/tokenize_throughput.py [--mbases 200] [--seq-len 8192]

Generates (once; cached in state/bench/tokenize/) two gzipped FASTA files of generated
primate-like sequence (jobs/tokenize/genomes.py, --mbases Mbp each, gzip level 6), then prints in one run:
  gunzip     single-core decompression of one file: the practical ceiling
  1 worker   the job end to end on one file, gz in -> committed Parquet out
  2 workers  the job on both files at once
and, for where the time goes, writing the tokens column alone as the job does, uncompressed, and in
the fixed_size_binary layout Contract 2 does not allow; all in MB of sequence per second.
Targets: 1 worker >= 50% of gunzip; 2 workers >= 1.6x 1 worker.
The Ray session is started and two workers warmed up before timing (a new worker spends seconds
importing); each figure is the best of --repeat runs, since other work on a shared machine only
ever slows a run down.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common.dataset import PARQUET_OPTIONS, tokens_array
from jobs.tokenize import TokenizeConfig, genomes, run
from jobs.tokenize.fasta import Source

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "state" / "bench" / "tokenize"
CONTIG_MBP = 25  # chromosome-sized contigs


def genome(index: int, mbases: int) -> tuple[Path, int]:
    """A cached generated genome of `mbases` Mbp and its number of bases."""
    contigs = [CONTIG_MBP * 1_000_000] * (mbases // CONTIG_MBP) + [mbases % CONTIG_MBP * 1_000_000]
    recipe = genomes.Recipe(f"bench-{index}-{mbases}mbp", contigs=tuple(c for c in contigs if c), seed=100 + index)
    path = WORK / f"{recipe.name}.fa.gz"
    if not path.exists():
        print(f"generating {path.name} ...", flush=True)
        WORK.mkdir(parents=True, exist_ok=True)
        genomes.write(recipe, WORK)
    return path, sum(recipe.contigs)


def gunzip_seconds(path: Path) -> float:
    start = time.perf_counter()
    for _ in Source(str(path)).chunks():
        pass
    return time.perf_counter() - start


def job_seconds(paths: list[Path], name: str, seq_len: int) -> float:
    output = WORK / name
    shutil.rmtree(output, ignore_errors=True)
    config = TokenizeConfig(
        inputs=[{"url": str(path), "assembly": path.stem, "organism": "generated (synthetic)", "group": "bench"}
                for path in paths],
        output=str(output), seq_len=seq_len, group_shares={"bench": 1.0},
    )
    start = time.perf_counter()
    run(config)
    return time.perf_counter() - start


def parquet_write_seconds(tokens: pa.Table, **options) -> float:
    """Writing one table of tokens to an in-memory Parquet file: the encoder alone, no I/O."""
    start = time.perf_counter()
    pq.write_table(tokens, pa.BufferOutputStream(), **options)
    return time.perf_counter() - start


def token_column_write(dataset: Path, repeat: int) -> tuple[float, float, float]:
    """MB/s of sequence for writing the train tokens of `dataset` again, in memory: as Contract 2's
    fixed-size list with the job's Parquet options, the same encoding uncompressed, and as
    fixed_size_binary(seq_len) with zstd (what Contract 2 does not allow)."""
    table = pq.read_table(dataset / "train", columns=["tokens"])
    matrix = tokens_array(table)
    as_binary = pa.table({"tokens": pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(matrix.shape[1]), len(matrix), [None, pa.py_buffer(matrix.tobytes())])})
    mb = matrix.size / 1e6
    element = "tokens.list.element"  # the job's options, for the one column
    level = TokenizeConfig.model_fields["zstd_level"].default
    as_job = {"compression": PARQUET_OPTIONS["compression"], "compression_level": level,
              "use_dictionary": False, "write_statistics": False,
              "column_encoding": {element: PARQUET_OPTIONS["column_encoding"][element]}}
    uncompressed = {**as_job, "compression": "none", "compression_level": None}
    binary = {"compression": "zstd", "compression_level": 1, "use_dictionary": False, "write_statistics": False}
    return tuple(mb / min(parquet_write_seconds(data, **options) for _ in range(repeat))
                 for data, options in ((table, as_job), (table, uncompressed), (as_binary, binary)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbases", type=int, default=200, help="Mbp of sequence per file (default 200)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest counts (default 3)")
    args = parser.parse_args()

    import ray

    (first, bases), (second, _) = genome(1, args.mbases), genome(2, args.mbases)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    job_seconds([first, second], "warmup", args.seq_len)  # starts two workers and warms them up

    def best(measure) -> float:
        return min(measure() for _ in range(args.repeat))

    mb = bases / 1e6
    gunzip = mb / best(lambda: gunzip_seconds(first))
    one = mb / best(lambda: job_seconds([first], "one-worker", args.seq_len))
    two = 2 * mb / best(lambda: job_seconds([first, second], "two-workers", args.seq_len))
    ray.shutdown()
    encoded, unpacked, binary = token_column_write(WORK / "one-worker", args.repeat)

    gz_mb = first.stat().st_size / 1e6
    print(f"\n{'':<10} {'MB/s of sequence':>17}  ({mb:.0f} MB of sequence per file, {gz_mb:.0f} MB gzipped)")
    print(f"{'gunzip':<10} {gunzip:>17.1f}  single core, the practical ceiling")
    print(f"{'1 worker':<10} {one:>17.1f}  {one / gunzip:.0%} of gunzip (target >= 50%)")
    print(f"{'2 workers':<10} {two:>17.1f}  {two / one:.2f}x 1 worker (target >= 1.6x)")
    print("\nWriting the tokens column alone (the 1-worker run's train split, in memory):")
    print(f"{'':<10} {encoded:>17.1f}  Contract 2's fixed-size list<uint8>, the job's encoding and zstd level")
    print(f"{'':<10} {unpacked:>17.1f}  the same, uncompressed: Parquet's per-token levels and INT32 widening")
    print(f"{'':<10} {binary:>17.1f}  fixed_size_binary(seq_len), zstd level 1: not allowed by Contract 2")


if __name__ == "__main__":
    main()
