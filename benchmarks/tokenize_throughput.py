"""Tokenisation throughput: single-core gunzip against the tokenize job with one and two workers.

    python benchmarks/tokenize_throughput.py [--mbases 200] [--seq-len 8192]

Generates (once; cached in state/bench/tokenize/) two gzipped FASTA files of generated
primate-like sequence (jobs/tokenize/genomes.py, --mbases Mbp each, gzip level 6), then prints in one run:
  gunzip     single-core decompression of one file: the practical ceiling
  reader     the job's FASTA reader alone on that file
  zstd-1/2   compressing its token bytes alone (1 MiB pages), at the job's default level (2) and at 1
  1 worker   the job end to end on one file, gz in -> committed Parquet out
  2 workers  the job on both files at once
all in MB of sequence per second. Targets: 1 worker >= 50% of gunzip (goal 80%); 2 workers >= 1.6x
1 worker. Where the time goes: run one worker's pass under a profiler (see the README).
The Ray session is started and two workers warmed up before timing (a new worker spends seconds
importing); each figure is the best of --repeat runs, since other work on a shared machine only
ever slows a run down.
"""

from __future__ import annotations

import argparse
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.common.fasta import Source, read_fasta
from jobs.tokenize import TokenizeConfig, genomes, run

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "state" / "bench" / "tokenize"
CONTIG_MBP = 25  # chromosome-sized contigs


def genome(index: int, mbases: int) -> tuple[Path, int]:
    """A cached generated genome of `mbases` Mbp and its number of bases."""
    contigs = [CONTIG_MBP * 1_000_000] * (mbases // CONTIG_MBP) + [mbases % CONTIG_MBP * 1_000_000]
    recipe = genomes.Recipe(name=f"bench-{index}-{mbases}mbp", contigs=tuple(c for c in contigs if c), seed=100 + index)
    path = WORK / f"{recipe.name}.fa.gz"
    if not path.exists():
        print(f"generating {path.name} ...", flush=True)
        WORK.mkdir(parents=True, exist_ok=True)
        genomes.write_genome(recipe, WORK)
    return path, sum(recipe.contigs)


def gunzip_seconds(path: Path) -> float:
    """Single-core gunzip as CPython's zlib (what `gunzip` runs) does it, from memory: the ceiling the
    targets are set against."""
    data = path.read_bytes()
    start = time.perf_counter()
    decompressor = zlib.decompressobj(31)
    for offset in range(0, len(data), 1 << 20):
        decompressor.decompress(data[offset : offset + (1 << 20)])
    return time.perf_counter() - start


def reader_seconds(path: Path) -> float:
    """The job's FASTA reader alone (ISA-L inflate + header search + one translate per block)."""
    start = time.perf_counter()
    for _ in read_fasta(Source(str(path))):
        pass
    return time.perf_counter() - start


def zstd_seconds(tokens: bytes, level: int) -> tuple[float, float]:
    """Compressing token bytes in Parquet-sized pages, as the shard writer does: seconds, and the
    compressed share of the bytes."""
    codec, page, size = pa.Codec("zstd", compression_level=level), 1 << 20, 0
    start = time.perf_counter()
    for offset in range(0, len(tokens), page):
        size += len(codec.compress(tokens[offset : offset + page], asbytes=True))
    return time.perf_counter() - start, size / len(tokens)


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
    reader = mb / best(lambda: reader_seconds(first))
    tokens = np.concatenate([ids for _, ids in read_fasta(Source(str(first)))]).tobytes()
    zstd = {level: min((zstd_seconds(tokens, level) for _ in range(args.repeat)), key=lambda r: r[0])
            for level in (2, 1)}
    del tokens
    one = mb / best(lambda: job_seconds([first], "one-worker", args.seq_len))
    two = 2 * mb / best(lambda: job_seconds([first, second], "two-workers", args.seq_len))
    ray.shutdown()

    gz_mb = first.stat().st_size / 1e6
    print(f"\n{'':<10} {'MB/s of sequence':>17}  ({mb:.0f} MB of sequence per file, {gz_mb:.0f} MB gzipped)")
    print(f"{'gunzip':<10} {gunzip:>17.1f}  single core, the practical ceiling")
    print(f"{'reader':<10} {reader:>17.1f}  the job's FASTA reader alone (ISA-L inflate, parse, encode)")
    for level, (seconds, share) in zstd.items():
        print(f"{f'zstd-{level}':<10} {mb / seconds:>17.1f}  its token bytes compressed alone, to {share:.3f} of their "
              "size")
    print(f"{'1 worker':<10} {one:>17.1f}  {one / gunzip:.0%} of gunzip (target >= 50%, goal 80%)")
    print(f"{'2 workers':<10} {two:>17.1f}  {two / one:.2f}x 1 worker (target >= 1.6x)")


if __name__ == "__main__":
    main()
