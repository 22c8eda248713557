"""An exported GengramLM: the directory every consumer of a trained model reads (continued
pretraining, evaluation, the MLflow registry, checkpoint conversion).

    <dir>/model.pt            fp32 state dict, experts under global indices (as ep_size 1 names them)
    <dir>/model_config.json   ModelConfig.to_dict(): ep_size 1, dropless routing
    <dir>/reference.pt        optional: {"input_ids", "logits"} of the trained model, to verify a load

PyTorch only: callers pass `open_file(name, mode)` for wherever the directory lives (local disk,
an object store), so this module knows nothing of storage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from model.config import ModelConfig
from model.transformer import GengramLM

WEIGHTS = "model.pt"
CONFIG = "model_config.json"
REFERENCE = "reference.pt"

OpenFile = Callable[[str, str], IO]


def local(directory: str | Path) -> OpenFile:
    """open_file for a local directory."""
    return lambda name, mode: open(Path(directory) / name, mode)


def read_config(open_file: OpenFile) -> ModelConfig:
    """The exported config, dropless whatever it was trained with (and older exports recorded):
    an exported model's outputs must not depend on what else is in its batch."""
    with open_file(CONFIG, "rt") as handle:
        return ModelConfig.from_dict(json.load(handle)).dropless()


def read_state_dict(open_file: OpenFile) -> dict[str, torch.Tensor]:
    with open_file(WEIGHTS, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)


def load(open_file: OpenFile) -> GengramLM:
    """The exported model with its weights, in eval mode on CPU."""
    model = GengramLM(read_config(open_file))
    model.load_state_dict(read_state_dict(open_file))
    return model.eval()


def write(directory: Path, state: dict[str, torch.Tensor], config: ModelConfig,
          reference: dict[str, torch.Tensor] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(config.replace(ep_size=1).dropless().to_dict(), indent=2))
    if reference is not None:
        torch.save(reference, directory / REFERENCE)
