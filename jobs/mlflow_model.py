"""The final model as an MLflow pyfunc, so it can be registered, versioned and served.

The weights stay a plain state dict file (model.pt + model_config.json) logged as the
pyfunc's artifacts: nothing is unpickled by class path, the driver never loads a large
model into memory to log it, and `GengramLM` reads the same files without MLflow.
This module imports only mlflow and `model`, so it ships with the model as a code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pyfunc

MODEL_ARTIFACT = "model"


def load_gengram(model_dir: str | Path):
    """GengramLM with the exported weights, in eval mode on CPU."""
    import torch

    from model import GengramLM, ModelConfig

    model_dir = Path(model_dir)
    config = ModelConfig.from_dict(json.loads((model_dir / "model_config.json").read_text()))
    model = GengramLM(config)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


class GengramPyfunc(mlflow.pyfunc.PythonModel):
    """predict: a column `sequence` of DNA strings -> per-sequence mean next-token loss and the
    final hidden state's mean (an embedding), the two things people score sequences with."""

    def load_context(self, context) -> None:
        self.model = load_gengram(Path(context.artifacts["weights"]).parent)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from model.vocab import encode

        rows = []
        for sequence in model_input["sequence"]:
            ids = torch.from_numpy(encode(sequence).astype("int64"))[None]
            with torch.no_grad():
                out = self.model(ids)
            rows.append({"loss": float(out.lm_loss), "length": ids.shape[1]})
        return pd.DataFrame(rows)


def log_gengram_model(tracking_uri: str, run_id: str, model_dir: Path, registered_name: str | None) -> str:
    """Log the pyfunc into `run_id` (and register it under `registered_name`); returns its URI."""
    mlflow.set_tracking_uri(tracking_uri)
    package_root = Path(__file__).resolve().parents[1]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=GengramPyfunc(),
            artifacts={"weights": str(model_dir / "model.pt"), "config": str(model_dir / "model_config.json")},
            code_paths=[str(package_root / "model"), __file__],
            registered_model_name=registered_name,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    """Pinned from this environment: MLflow's own inference imports the model to guess them,
    which is slow and drags in the whole training stack."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "deepspeed", "mlflow", "numpy", "pandas")]
