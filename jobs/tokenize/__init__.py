"""The tokenize job (`python -m jobs.tokenize`): genomes on any fsspec URL -> a dataset of Parquet
shards and its manifest (jobs.common.dataset defines both).

Public API: the config, `run` (returns the finished dataset's manifest) and its summary. The rest
(assemblies, FASTA and annotation reading, fragments, plan, Ray Data source and sink, the
generated genomes) is internal.
"""

from jobs.tokenize.config import TokenizeConfig
from jobs.tokenize.job import run, summary

__all__ = ["TokenizeConfig", "run", "summary"]
