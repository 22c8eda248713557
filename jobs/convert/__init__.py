"""The conversion job (`python -m jobs.convert`): the authors' Megatron checkpoints into GengramLM's exported
model directory, and back into the legacy Megatron layout.

Public API: the config, `run`, what a run returns and its summary. The rest of the package (the tensor
mapping in `megatron`, the checkpoint layouts in `legacy`, the driver in `job`) is internal.
"""

from jobs.convert.config import ConvertConfig
from jobs.convert.job import ConversionResult, run, summary

__all__ = ["ConversionResult", "ConvertConfig", "run", "summary"]
