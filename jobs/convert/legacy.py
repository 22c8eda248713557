"""Megatron's legacy `torch` checkpoint layout, read and written without Megatron:

    <root>/latest_checkpointed_iteration.txt          the iteration number (or "release")
    <root>/iter_<n:07d>/mp_rank_00/model_optim_rng.pt              one pipeline stage
    <root>/iter_<n:07d>/mp_rank_00_<stage:03d>/model_optim_rng.pt  several stages
        {"model": state dict, "args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": n, ...}

Each stage numbers its layers from 0; the first holds the embedding, the last the final norm and the
output layer. The pickled args hold Megatron objects (enums such as `attention_backend`), so a plain
unpickle needs Megatron importable: the unpickler here turns every Megatron class into an inert
stand-in and refuses anything that is neither a tensor, a plain value nor a Megatron class. Only plain
fields of the args are read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jobs.common.storage import filesystem, is_local, join, read_bytes
from jobs.convert.megatron import EXTRA_STATE, ConversionError, layer_prefix

TRACKER = "latest_checkpointed_iteration.txt"
STAGE_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0  # Megatron's: QKV packed per query group
LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def iteration_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def stage_dir(stage: int, stages: int) -> str:
    return "mp_rank_00" if stages == 1 else f"mp_rank_00_{stage:03d}"


def latest_iteration(root: str, options: Mapping[str, Any] | None = None) -> int | str:
    try:
        text = read_bytes(join(root, TRACKER), options).decode().strip()
    except FileNotFoundError:
        raise ConversionError(f"{join(root, TRACKER)} not found: not a Megatron checkpoint directory") from None
    return text if text == "release" else int(text)


# --- unpickling without Megatron -------------------------------------------------------------------


class MegatronStandIn:
    """What a Megatron object unpickles to here: its constructor arguments and state, kept, never used."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STAND_INS: dict[tuple[str, str], type] = {}
# What a checkpoint is made of besides Megatron's classes: the args' Namespace, containers, tensors
# (torch's rebuild functions, sizes, devices, layouts, dtypes) and the RNG states (numpy arrays).
ALLOWED_GLOBALS = {
    ("argparse", "Namespace"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("_codecs", "encode"), ("io", "BytesIO"), ("torch", "Size"), ("torch", "device"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch.serialization", "_get_layout"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


def allowed(module: str, name: str) -> bool:
    if (module, name) in ALLOWED_GLOBALS or (module == "torch._utils" and name.startswith("_rebuild_")):
        return True
    if module == "numpy.dtypes":  # numpy's dtype classes, e.g. UInt32DType
        return name.endswith("DType")
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout)


class MegatronUnpickler(pickle.Unpickler):
    """Megatron's classes become inert stand-ins; anything that is not in a checkpoint's make-up is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in ("megatron", "transformer_engine"):
            key = (module, name)
            if key not in _STAND_INS:
                _STAND_INS[key] = type(name, (MegatronStandIn,), {"__module__": module})
            return _STAND_INS[key]
        if allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is neither a tensor, a plain value nor a Megatron class")


# torch.load takes the pickle module to unpickle with: one whose Unpickler is the one above.
megatron_pickle = types.ModuleType("megatron_pickle")
megatron_pickle.Unpickler = MegatronUnpickler
megatron_pickle.load = lambda file, **kwargs: MegatronUnpickler(file, **kwargs).load()


def plain_fields(namespace: argparse.Namespace) -> dict[str, Any]:
    """The args' fields that are plain values (numbers, strings, None, lists of those)."""

    def plain(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return all(plain(item) for item in value)
        return value is None or isinstance(value, bool | int | float | str)

    return {name: value for name, value in vars(namespace).items() if plain(value)}


# --- reading ---------------------------------------------------------------------------------------


class LegacyCheckpoint:
    """One iteration of a legacy checkpoint, its stages merged: `args` (plain fields), `shapes` and
    `read(name)` by global Megatron name. Stage files are memory-mapped (remote ones copied to a local
    temporary file first), so a tensor is in memory only while it is being converted."""

    def __init__(self, root: str, iteration: int | str | None = None, options: Mapping[str, Any] | None = None):
        self.root, self.options = root, options
        self.iteration = latest_iteration(root, options) if iteration is None else iteration
        self._scratch = contextlib.ExitStack()
        # Stage 0's args say how many stages there are; its directory says whether there are several.
        fs, path = filesystem(join(root, iteration_dir(self.iteration), stage_dir(0, 1)), options)
        several = not fs.exists(path)
        first = self._load_stage(0, 2 if several else 1)
        if not isinstance(first.get("args"), argparse.Namespace):
            raise ConversionError(f"{self.stage_url(0, 2 if several else 1)} holds no Megatron args")
        self.args = plain_fields(first["args"])
        stages = self.args.get("pipeline_model_parallel_size") or 1
        if several != (stages > 1):
            raise ConversionError(f"{root}: the args say {stages} pipeline stage(s), the directories differ")
        self.tensors: dict[str, Tensor] = {}
        offset = 0
        for stage in range(stages):
            checkpoint = first if stage == 0 else self._load_stage(stage, stages)
            offset += self._merge(checkpoint, self.stage_url(stage, stages), offset)
        self.shapes = {name: tuple(tensor.shape) for name, tensor in self.tensors.items()}

    def stage_url(self, stage: int, stages: int) -> str:
        return join(self.root, iteration_dir(self.iteration), stage_dir(stage, stages), STAGE_FILE)

    def _load_stage(self, stage: int, stages: int) -> dict[str, Any]:
        url = self.stage_url(stage, stages)
        fs, path = filesystem(url, self.options)
        try:
            if not is_local(fs):
                local = os.path.join(self._scratch.enter_context(tempfile.TemporaryDirectory()), STAGE_FILE)
                fs.get(path, local)
                path = local
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=megatron_pickle)
        except FileNotFoundError:
            raise ConversionError(f"pipeline stage {stage} is missing: {url} not found") from None
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
            raise ConversionError(f"{url} cannot be read (truncated or not a Megatron checkpoint): {error}") from None

    def _merge(self, checkpoint: Mapping[str, Any], url: str, offset: int) -> int:
        """Add a stage's tensors under global layer numbers; returns how many layers it holds."""
        version = checkpoint.get("checkpoint_version", 0)
        if version < CHECKPOINT_VERSION:
            raise ConversionError(f"{url}: checkpoint_version {version}; only {CHECKPOINT_VERSION} packs QKV per group")
        if "model" not in checkpoint:
            found = sorted(key for key in checkpoint if key.startswith("model"))
            raise ConversionError(f"{url} holds no 'model' (virtual pipeline stages {found} are not supported)")
        layers = set()
        for name, tensor in checkpoint["model"].items():
            if name.endswith(EXTRA_STATE):
                continue
            match = LAYER.match(name)
            if match:
                layers.add(int(match[1]))
                name = layer_prefix(offset + int(match[1])) + match[2]
            self.tensors[name] = tensor
        return len(layers)

    def read(self, name: str) -> Tensor:
        return self.tensors[name]

    def close(self) -> None:
        self.tensors.clear()
        self._scratch.close()

    def __enter__(self) -> LegacyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- writing ---------------------------------------------------------------------------------------


def write(root: Path, state: Mapping[str, Tensor | None], args: Mapping[str, Any], iteration: int,
          stages: int) -> None:
    """A legacy checkpoint of `state` (global Megatron names) split into `stages` pipeline stages of
    equal layer counts, as the fork loads it (`--load <root>`)."""
    num_layers = args["num_layers"]
    if num_layers % stages:
        raise ConversionError(f"{num_layers} layers do not split into {stages} equal pipeline stages")
    per_stage = num_layers // stages
    parts: list[dict[str, Tensor | None]] = [{} for _ in range(stages)]
    for name, tensor in state.items():
        match = LAYER.match(name)
        if match:
            stage, local = divmod(int(match[1]), per_stage)
            parts[stage][layer_prefix(local) + match[2]] = tensor
        else:  # the embedding opens the first stage; the final norm and the output layer close the last
            parts[0 if name.startswith("embedding.") else -1][name] = tensor
    namespace = argparse.Namespace(**args)
    for stage, part in enumerate(parts):
        directory = root / iteration_dir(iteration) / stage_dir(stage, stages)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"model": part, "args": namespace, "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": iteration}, directory / STAGE_FILE)
    (root / TRACKER).write_text(str(iteration))
