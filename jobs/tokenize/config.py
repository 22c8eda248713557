"""The tokenize job's typed config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from jobs.common.config import StrictModel
from jobs.common.storage import StorageRule
from jobs.tokenize.assemblies import InputSpec
from jobs.tokenize.fragments import FragmentSpec


class TokenizeConfig(StrictModel):
    # What to read: inline inputs, or assembly list files (YAML, any URL, e.g. jobs/assemblies/*.yaml).
    inputs: list[InputSpec] = Field(default_factory=list)
    assemblies: str | list[str] | None = None
    output: str  # dataset directory or URL
    seq_len: int = Field(8192, ge=8)  # 8192 for stage I, 32768 for the long-context stage
    final_window: Literal["drop", "pad"] = "drop"  # a contig's last, partial window
    strand: Literal["forward", "random", "both"] = "forward"
    reverse_prob: float = Field(0.56, ge=0, le=1)  # strand=random: share of reverse complements
    min_acgt_fraction: float = Field(0.9, ge=0, le=1)  # of a fragment's bases
    gene_flank: int | None = Field(5120, ge=0)  # with an annotation: keep fragments this close to a gene
    group_shares: dict[str, float] = Field(default_factory=lambda: {"human": 0.5, "non-human": 0.5})
    token_budget: int | None = Field(None, ge=1)  # total bases kept, both splits
    val_fraction: float = Field(0.01, ge=0, lt=1)
    seed: int = 0
    shard_mib: float = Field(256, gt=0)  # shard file size: a shard closes at the first row group past it
    # Level 2, not 1: on token bytes (few long matches, mostly entropy-coded literals) it is faster and
    # about as small (benchmarks/tokenize_throughput.py: 431 against 403 MB/s, to 0.278 against 0.276).
    zstd_level: int = Field(2, ge=-7, le=22)
    storage: list[StorageRule] = Field(default_factory=list)  # endpoints and anonymous access, no secrets
    force: bool = False  # replace a finished dataset at `output`

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        # "manifest" now means only a dataset's manifest.json; the old spelling would otherwise be
        # reported as merely unknown.
        if isinstance(data, dict) and "manifest" in data:
            raise ValueError("the key `manifest` is now `assemblies` (the assembly list files to read); rename it")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TokenizeConfig:
        if bool(self.inputs) == bool(self.assemblies):
            raise ValueError("give exactly one of `inputs` (a list) or `assemblies` (assembly list files)")
        if any(share < 0 for share in self.group_shares.values()) or not self.group_shares:
            raise ValueError("group_shares must map groups to non-negative shares")
        if abs(sum(self.group_shares.values()) - 1) > 1e-6:
            raise ValueError(f"group_shares must sum to 1, not {sum(self.group_shares.values())}")
        return self

    def fragment_spec(self) -> FragmentSpec:
        return FragmentSpec(
            seq_len=self.seq_len,
            pad_final=self.final_window == "pad",
            min_acgt_fraction=self.min_acgt_fraction,
            gene_flank=self.gene_flank,
            strand=self.strand,
            reverse_prob=self.reverse_prob,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )
