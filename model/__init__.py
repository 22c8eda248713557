"""The Gengram DNA language model: vocabulary, Gengram memory, MoE transformer. PyTorch only.

Names are imported on first use, so that `model.vocab` (all a tokenising worker needs) does not
pay for importing torch.
"""

import importlib

_EXPORTS = {
    "FLAVOURS": "model.config",
    "GengramConfig": "model.config",
    "ModelConfig": "model.config",
    "flavour": "model.config",
    "Gengram": "model.gengram",
    "GengramLM": "model.transformer",
    "LMOutput": "model.transformer",
    "parameter_counts": "model.transformer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
