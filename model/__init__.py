"""The Gengram DNA language model: vocabulary, Gengram memory, MoE transformer. PyTorch only."""

from model.config import FLAVOURS, GengramConfig, ModelConfig, flavour
from model.gengram import Gengram
from model.transformer import GengramLM, LMOutput, parameter_counts

__all__ = [
    "FLAVOURS",
    "Gengram",
    "GengramConfig",
    "GengramLM",
    "LMOutput",
    "ModelConfig",
    "flavour",
    "parameter_counts",
]
