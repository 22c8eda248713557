"""The tokenize job (`python -m jobs.tokenize`): genomes on any fsspec URL -> a dataset of Parquet
shards and its manifest (jobs.common.dataset defines both).

Public API: the config, `run` (returns the finished dataset's manifest) and its summary. The rest
(assemblies, FASTA and annotation reading, fragments, plan, Ray Data source and sink) is internal;
the genome generator's recipes and writer are public, for the experiment's generated genomes.
"""

from jobs.tokenize.config import TokenizeConfig
from jobs.tokenize.genomes import IID, Recipe, Structure, write_genome
from jobs.tokenize.job import run, summary

__all__ = ["IID", "Recipe", "Structure", "TokenizeConfig", "run", "summary", "write_genome"]
