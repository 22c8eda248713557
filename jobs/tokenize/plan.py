"""Everything about a tokenisation that is resolved and checked on the driver before any Ray work:
the inputs, their storage options, the dataset's content hash and the shard sizes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from jobs.common import storage
from jobs.common.config import ConfigError, config_hash, config_to_dict
from jobs.common.fasta import Source, ncbi_member
from jobs.tokenize.assemblies import BUNDLED, NCBI_DATASETS_API, InputSpec, load_assembly_list
from jobs.tokenize.config import TokenizeConfig

BLOCK_BYTES = 32 << 20  # token payload per Arrow block handed to Ray Data
ROW_GROUP_BYTES = 64 << 20  # token payload per Parquet row group


# Keys that say where a dataset goes, or how its inputs are listed, rather than what it holds:
# they stay out of its hash, which covers the resolved inputs instead.
PLACEMENT_KEYS = ("output", "storage", "force", "inputs", "assemblies")


@dataclass(frozen=True)
class WorkItem:
    """Everything a read task needs about one input."""

    index: int
    assembly: str
    organism: str
    group: str
    url: str  # absolute when local: tasks do not share the driver's working directory
    options: dict
    annotation: str | None
    annotation_options: dict

    def source(self) -> Source:
        return Source(self.url, self.options, ncbi_member(self.assembly))

    def annotation_source(self) -> Source:
        if self.annotation == BUNDLED:
            return Source(self.url, self.options, ncbi_member(self.assembly, annotation=True))
        return Source(self.annotation, self.annotation_options, ncbi_member(self.assembly, annotation=True))


@dataclass(frozen=True)
class Plan:
    config: TokenizeConfig
    inputs: list[InputSpec]  # resolved, as recorded in the manifest
    items: list[WorkItem]
    config_hash: str
    output: str
    output_options: dict
    shard_bytes: int
    group_rows: int

    @property
    def needs_balancing(self) -> bool:
        return len(self.config.group_shares) > 1 or self.config.token_budget is not None


def make_plan(config: TokenizeConfig) -> Plan:
    """Resolve and check everything that can be checked before any Ray work."""
    rules = list(config.storage)
    if config.assemblies:
        specs = []
        for url in [config.assemblies] if isinstance(config.assemblies, str) else config.assemblies:
            assemblies = load_assembly_list(url, config.storage)
            specs += assemblies.inputs
            rules += assemblies.storage  # after the job's own rules, which win ties
    else:
        specs = [spec.resolved() for spec in config.inputs]
    _check_inputs(specs, config)
    items = [
        WorkItem(
            index=index,
            assembly=spec.assembly,
            organism=spec.organism,
            group=spec.group,
            url=storage.absolute(spec.url),
            options=storage.options_for(spec.url, rules),
            annotation=spec.annotation if spec.annotation in (None, BUNDLED) else storage.absolute(spec.annotation),
            annotation_options=storage.options_for(spec.annotation or "", rules),
        )
        for index, spec in enumerate(specs)
    ]
    content = {key: value for key, value in config_to_dict(config).items() if key not in PLACEMENT_KEYS}
    content["inputs"] = [spec.model_dump(mode="json") for spec in specs]
    output = storage.absolute(config.output)
    shard_bytes = int(config.shard_mib * (1 << 20))
    return Plan(config, specs, items, config_hash(content), output, storage.options_for(output, rules),
                shard_bytes, group_rows(config.seq_len, shard_bytes))


def _check_inputs(specs: list[InputSpec], config: TokenizeConfig) -> None:
    assemblies = Counter(spec.assembly for spec in specs)
    repeated = sorted(name for name, count in assemblies.items() if count > 1)
    if repeated:
        raise ConfigError(f"assembly ids must be unique (they seed the split and strand hashes): {repeated}")
    groups = {spec.group for spec in specs}
    unknown = sorted(groups - set(config.group_shares))
    if unknown:
        raise ConfigError(f"inputs have groups {unknown} that group_shares does not list ({config.group_shares})")
    empty = sorted(group for group, share in config.group_shares.items() if share > 0 and group not in groups)
    if empty:
        raise ConfigError(f"group_shares gives a share to {empty}, but no input has that group")
    bundled = [spec.assembly for spec in specs if spec.annotation == BUNDLED and not _is_package(spec.url)]
    if bundled:
        raise ConfigError(f"`annotation: {BUNDLED}` needs an NCBI Datasets package (an accession or a .zip); "
                          f"not so for {bundled}")


def _is_package(url: str) -> bool:
    return url.startswith(NCBI_DATASETS_API) or url.split("?")[0].endswith(".zip")


def group_rows(seq_len: int, shard_bytes: int) -> int:
    """Rows per Parquet row group: ROW_GROUP_BYTES of tokens, or fewer for shards smaller than
    that, so that a shard (tokens compress to about a third) holds several row groups and a
    reader can stream it."""
    return max(1, min(ROW_GROUP_BYTES, shard_bytes) // seq_len)
