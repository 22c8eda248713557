"""Megatron's `torch_dist` checkpoint layout, read with torch.distributed.checkpoint alone:

    <root>/latest_checkpointed_iteration.txt
    <root>/iter_<n:07d>/metadata.json      {"sharded_backend": "torch_dist", ...}
    <root>/iter_<n:07d>/.metadata          torch's checkpoint Metadata (Megatron may pickle its own subclass)
    <root>/iter_<n:07d>/__<rank>_<i>.distcp
    <root>/iter_<n:07d>/common.pt          what is not sharded, among it the `args`

The model's tensors are global there: one key per tensor kind, the layers stacked on a leading axis
(`decoder.layers.self_attention.linear_qkv.weight` [L, ...]) and the experts on a second
(`decoder.layers.mlp.experts.experts.linear_fc1.weight` [L, E, 2F, H]); both norms carry
transformer-engine names whatever the layer spec. This reader presents them under the per-layer names of
the transformer-engine spelling (jobs.convert.megatron) and reads one layer of every stacked key at a
time, so that no more than a layer is held beside the converted model. torch's reader reads local files:
a checkpoint elsewhere is copied to local scratch space first (the files it needs, checked first).
"""

from __future__ import annotations

import os
import pickle
import posixpath
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from jobs.common.storage import exists, filesystem, is_local, join, open_url
from jobs.convert.legacy import iteration_dir, latest_iteration, megatron_pickle, plain_fields
from jobs.convert.megatron import ConversionError, layer_prefix

BACKEND_FILE = "metadata.json"
METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # the rest (optimizer, RNG) is training state
STACKED = "decoder.layers."
EXPERTS = re.compile(r"^mlp\.experts\.experts\.(linear_fc[12])\.weight$")
# Stacked names whose per-layer name in the transformer-engine spelling differs.
RENAMED = {"mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
           "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight"}


def is_torch_dist(root: str, iteration: int | str, options: Mapping[str, Any] | None = None) -> bool:
    return exists(join(root, iteration_dir(iteration), BACKEND_FILE), options)


class MetadataUnpickler(pickle.Unpickler):
    """Megatron pickles its subclasses of torch's Metadata and SavePlan (one extra field each): read them
    as torch's own, the extra field kept as an attribute that nothing reads."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "megatron":
            if name.endswith("Metadata"):
                return Metadata
            if name.endswith("SavePlan"):
                return SavePlan
            raise pickle.UnpicklingError(f"{module}.{name} in a checkpoint's .metadata is not a torch metadata class")
        return super().find_class(module, name)


class MegatronReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as handle:
            metadata = MetadataUnpickler(handle).load()
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


class RegionPlanner(DefaultLoadPlanner):
    """Loads a region of each requested key: `offsets[key]` is where the destination tensor starts in it."""

    def __init__(self, offsets: Mapping[str, tuple[int, ...]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, tensor in self.state_dict.items():
            region = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=tensor.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [region])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        return self.state_dict[index.fqn]


def check_files(fs, path: str, url: str, metadata: Metadata) -> list[str]:
    """The .distcp files the index points into, each present and long enough: every one that is not, named."""
    needed: dict[str, int] = {}
    for stored in metadata.storage_data.values():
        needed[stored.relative_path] = max(needed.get(stored.relative_path, 0), stored.offset + stored.length)
    problems = []
    for name, length in sorted(needed.items()):
        file = posixpath.join(path, name)
        if not fs.exists(file):
            problems.append(f"{join(url, name)} is missing")
        elif fs.size(file) < length:
            problems.append(f"{join(url, name)} is truncated ({fs.size(file)} bytes; the index reads up to {length})")
    if problems:
        raise ConversionError("; ".join(problems))
    return sorted(needed)


class TorchDistCheckpoint:
    """One iteration of a torch_dist checkpoint: `args`, `shapes` and `read(name)` by per-layer Megatron
    name, as legacy.LegacyCheckpoint offers them."""

    def __init__(self, root: str, iteration: int | str | None = None, options: Mapping[str, Any] | None = None):
        self.iteration = latest_iteration(root, options) if iteration is None else iteration
        self.url = join(root, iteration_dir(self.iteration))
        fs, path = filesystem(self.url, options)
        common = join(self.url, COMMON_FILE)
        try:
            with open_url(common, "rb", options) as handle:
                saved = torch.load(handle, map_location="cpu", weights_only=False, pickle_module=megatron_pickle)
            with open_url(join(self.url, METADATA_FILE), "rb", options) as handle:
                metadata = MetadataUnpickler(handle).load()
        except FileNotFoundError as error:
            raise ConversionError(f"{self.url}: {error.filename or error} not found") from None
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ConversionError(f"{self.url} cannot be read (truncated or not Megatron's?): {error}") from None
        files = check_files(fs, path, self.url, metadata)
        # torch's reader reads local files: a remote checkpoint is copied to local scratch space first.
        self._scratch = tempfile.TemporaryDirectory() if not is_local(fs) else None
        if self._scratch is not None:
            for name in [METADATA_FILE, *files]:
                fs.get_file(posixpath.join(path, name), os.path.join(self._scratch.name, name))
            path = self._scratch.name
        self.reader_path = path
        self.args = plain_fields(saved["args"]) if "args" in saved else {}  # {}: the job takes a named flavour
        self.stored = {key: md for key, md in metadata.state_dict_metadata.items()
                       if isinstance(md, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES)}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.source: dict[str, tuple[str, int | None, int | None]] = {}  # name -> (key, layer, expert)
        for key, md in self.stored.items():
            self._present(key, tuple(md.size))
        self._layer: int | None = None
        self._cache: dict[str, Tensor] = {}

    def _present(self, key: str, size: tuple[int, ...]) -> None:
        """Per-layer (and per-expert) names for a stored key."""
        if not key.startswith(STACKED):
            self.shapes[key], self.source[key] = size, (key, None, None)
            return
        rest = key.removeprefix(STACKED)
        experts = EXPERTS.match(rest)
        for i in range(size[0]):
            if experts:
                for e in range(size[1]):
                    name = f"{layer_prefix(i)}mlp.experts.{experts[1]}.weight{e}"
                    self.shapes[name], self.source[name] = size[2:], (key, i, e)
            else:
                name = layer_prefix(i) + RENAMED.get(rest, rest)
                self.shapes[name], self.source[name] = size[1:], (key, i, None)

    def _load(self, offsets: Mapping[str, tuple[int, ...]], sizes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
        tensors = {key: torch.empty(sizes[key], dtype=self.stored[key].properties.dtype) for key in offsets}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(tensors, storage_reader=MegatronReader(self.reader_path), planner=RegionPlanner(offsets),
                         no_dist=True)
        except CheckpointException as error:  # torch's wrapper of a reader's failure (a BaseException)
            raise ConversionError(f"{self.url} cannot be read (a truncated or missing .distcp?): {error}") from None
        return tensors

    def read(self, name: str) -> Tensor:
        key, layer, expert = self.source[name]
        if layer is None:
            size = tuple(self.stored[key].size)
            return self._load({key: (0,) * len(size)}, {key: size})[key]
        if layer != self._layer:  # every stacked key's slice of this layer, in one read
            keys = sorted({k for k, i, _ in self.source.values() if i == layer})
            sizes = {k: (1, *self.stored[k].size[1:]) for k in keys}
            offsets = {k: (layer,) + (0,) * (len(sizes[k]) - 1) for k in keys}
            self._cache = {k: tensor[0] for k, tensor in self._load(offsets, sizes).items()}
            self._layer = layer
        tensor = self._cache[key]
        return tensor if expert is None else tensor[expert]

    def close(self) -> None:
        self._cache.clear()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self) -> TorchDistCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
