"""Which genomes to read: input specs, assembly lists (the YAML files under jobs/assemblies/)
and NCBI accessions resolved to NCBI Datasets downloads.
"""

from __future__ import annotations

import posixpath
import re

import yaml
from pydantic import Field, ValidationError, model_validator

from jobs.common import storage
from jobs.common.config import ConfigError, StrictModel
from jobs.common.storage import StorageRule

NCBI_ACCESSION = re.compile(r"^GC[AF]_\d{9}\.\d+$")
NCBI_DATASETS_API = "https://api.ncbi.nlm.nih.gov/datasets/v2"
# `annotation: bundled` takes the annotation from inside an NCBI Datasets genome zip.
BUNDLED = "bundled"


def ncbi_download_url(accession: str, annotation: bool = False) -> str:
    """The NCBI Datasets genome package (a zip) of an assembly accession."""
    if not NCBI_ACCESSION.match(accession):
        raise ConfigError(f"{accession!r} is not an NCBI assembly accession (GCA_/GCF_ + 9 digits + version)")
    kinds = "&include_annotation_type=GENOME_GFF" if annotation else ""
    return f"{NCBI_DATASETS_API}/genome/accession/{accession}/download?include_annotation_type=GENOME_FASTA{kinds}"


class InputSpec(StrictModel):
    """One assembly. `url` may be omitted when `assembly` is an NCBI accession."""

    url: str | None = None
    assembly: str = Field(min_length=1)
    organism: str = Field(min_length=1)
    group: str = Field(min_length=1)
    annotation: str | None = None  # GFF3/GTF URL (plain or gz), or "bundled" (inside an NCBI zip)

    @model_validator(mode="after")
    def _locatable(self) -> InputSpec:
        if self.url is None and not NCBI_ACCESSION.match(self.assembly):
            raise ValueError(f"input {self.assembly!r} has no url and its assembly id is not an NCBI accession")
        return self

    def resolved(self, base: str | None = None) -> InputSpec:
        """Accessions become download URLs; relative paths are taken relative to `base` (an assembly list's folder)."""
        url = self.url or ncbi_download_url(self.assembly, annotation=self.annotation == BUNDLED)
        annotation = self.annotation
        if base is not None:
            url = _relative_to(base, url)
            annotation = annotation if annotation in (None, BUNDLED) else _relative_to(base, annotation)
        return self.model_copy(update={"url": url, "annotation": annotation})


def _relative_to(base: str, url: str) -> str:
    if "://" in url or posixpath.isabs(url):
        return url
    return posixpath.normpath(posixpath.join(base, url)) if "://" not in base else storage.join(base, url)


class AssemblyList(StrictModel):
    """An assembly list file: where the genomes of a set are and how to reach them."""

    description: str = ""
    source: str = ""
    # Defaults for reaching these inputs (e.g. anonymous access to a public bucket); rules in the
    # job config take precedence.
    storage: list[StorageRule] = Field(default_factory=list)
    inputs: list[InputSpec] = Field(min_length=1)


def load_assembly_list(url: str, rules: list[StorageRule] | tuple[StorageRule, ...] = ()) -> AssemblyList:
    """Read an assembly list; relative paths in it are relative to the list's own folder (and
    stay relative in what is recorded, so that a dataset's manifest does not depend on where
    the repository was checked out)."""
    try:
        text = storage.read_bytes(storage.absolute(url), storage.options_for(url, rules))
    except FileNotFoundError:
        raise ConfigError(f"assembly list not found: {url}") from None
    try:
        assemblies = AssemblyList.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as error:
        raise ConfigError(f"assembly list {url} is not valid: {error}") from None
    base = posixpath.dirname(url)
    return assemblies.model_copy(update={"inputs": [spec.resolved(base) for spec in assemblies.inputs]})
