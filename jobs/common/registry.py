"""An exported model (a pretraining run's final model, a converted checkpoint) as an MLflow pyfunc, so it
can be registered, versioned and served.

The weights stay a plain state dict file (model.pt + model_config.json) logged as the
pyfunc's artifacts: nothing is unpickled by class path, the driver never loads a large
model into memory to log it, and `GengramLM` reads the same files without MLflow.
This module imports only mlflow, pandas, torch and `model`, so it ships with the model as a code
path.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch

from model import exported
from model.vocab import encode

MODEL_ARTIFACT = "model"


class GengramPyfunc(mlflow.pyfunc.PythonModel):
    """predict: a column `sequence` of DNA strings -> per sequence its mean next-token loss (nats)
    and its length in tokens."""

    def load_context(self, context) -> None:
        self.model = exported.load(exported.local(Path(context.artifacts["weights"]).parent))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = []
        for sequence in model_input["sequence"]:
            ids = torch.from_numpy(encode(sequence).astype("int64"))[None]
            with torch.no_grad():
                out = self.model(ids)
            rows.append({"loss": float(out.lm_loss), "length": ids.shape[1]})
        return pd.DataFrame(rows)


def log_gengram_model(tracking_uri: str, run_id: str, model_dir: Path, registered_name: str | None) -> str:
    """Log the pyfunc into `run_id` (and register it under `registered_name`); returns its URI:
    models:/<name>/<version> when registered, else the logged model's."""
    mlflow.set_tracking_uri(tracking_uri)
    package_root = Path(__file__).resolve().parents[2]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=GengramPyfunc(),
            artifacts={"weights": str(model_dir / "model.pt"), "config": str(model_dir / "model_config.json")},
            code_paths=[str(package_root / "model"), __file__],
            registered_model_name=registered_name,
            pip_requirements=_requirements(),
        )
    if registered_name is None:
        return info.model_uri
    return f"models:/{registered_name}/{info.registered_model_version}"


def _requirements() -> list[str]:
    """Pinned from this environment: MLflow's own inference imports the model to guess them,
    which is slow and drags in the whole training stack."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "deepspeed", "mlflow", "numpy", "pandas")]
