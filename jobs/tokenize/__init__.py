"""The tokenize job (`python -m jobs.tokenize`): genomes on any fsspec URL -> a dataset of Parquet
shards and its manifest (jobs.common.dataset defines both).

Public API: the config, `run` (returns the finished dataset's manifest) and its summary. The rest
(assemblies, FASTA and annotation reading, fragments, plan, Ray Data source and sink) is internal;
the genome generator's recipes and writer are public, for the experiment's generated genomes.
"""

from jobs.tokenize.config import TokenizeConfig
from jobs.tokenize.job import run, summary

GENOME_NAMES = ("Recipe", "Structure", "named_structure", "write_genome")


def __getattr__(name: str):
    # The generator is imported on first use, not with the package: `python -m jobs.tokenize.genomes`
    # would otherwise find its module imported twice (runpy warns of it).
    if name in GENOME_NAMES:
        from jobs.tokenize import genomes

        return getattr(genomes, name)
    raise AttributeError(f"module 'jobs.tokenize' has no attribute {name!r}")

__all__ = ["Recipe", "Structure", "TokenizeConfig", "named_structure", "run", "summary", "write_genome"]
