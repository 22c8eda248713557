"""MoE load balance and loss of the quickstart run, before and after a change, side by side in one run.

    .venv/bin/python benchmarks/moe_balance.py [--before 34039d7^] [--steps 100]

Runs `python -m jobs.quickstart` (tokenise the quickstart set, pretrain the debug flavour on two Ray
Train workers) twice, each in its own process and state directory: once from a git worktree of the
`--before` commit (default: the commit before dropless routing, Megatron's summed load-balancing loss
and Megatron's initialisation), once from this tree. Each run logs to its own MLflow store; the table
reads back, per MoE layer, the coefficient of variation of the experts' token shares (0 is perfectly
balanced; 4 experts all on one gives sqrt(3) = 1.73) at the last logged step and its mean over the
run, the Gengram gates' open fraction, the final train and validation loss, and the share of step time
spent waiting for data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (1, 2, 3, 4)  # the debug flavour's MoE layers
GATE_LAYERS = (2, 3)  # and its Gengram layers


def quickstart(tree: Path, state: Path, steps: int) -> str:
    """Run the quickstart of `tree` with its state (data, checkpoints, MLflow) under `state`; its tracking URI."""
    uri = f"sqlite:///{state / 'mlflow.db'}"
    env = {**os.environ, "GENGRAM_HOME": str(state), "PYTHONPATH": str(tree)}
    # No RAY_ADDRESS: each quickstart starts a local cluster sized for its run (a Ray cluster already
    # running on the machine would be joined instead, as the jobs do).
    env.pop("RAY_ADDRESS", None)
    (state / "jobs").mkdir(parents=True, exist_ok=True)
    # Relative paths in the quickstart configs (jobs/assemblies/..., state/...) resolve against GENGRAM_HOME.
    for name in ("assemblies", "manifests"):
        if (tree / "jobs" / name).exists():
            shutil.copytree(tree / "jobs" / name, state / "jobs" / name, dirs_exist_ok=True)
    command = [sys.executable, "-m", "jobs.quickstart", f"train.max_steps={steps}", f"tracking.uri={uri}",
               "tracking.registered_model=null"]
    print(f"running the quickstart of {tree} ...", flush=True)
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return uri


def figures(uri: str) -> dict[str, float]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gengram-quickstart")  # pretrain-quickstart.yaml's
    run = client.search_runs([experiment.experiment_id], max_results=1)[0]
    out: dict[str, float] = {}
    for layer in LAYERS:
        history = sorted(client.get_metric_history(run.info.run_id, f"moe/layer{layer}/cv"), key=lambda m: m.step)
        out[f"cv layer {layer}, last step"] = history[-1].value
        out[f"cv layer {layer}, mean over run"] = statistics.fmean(m.value for m in history)
    for layer in GATE_LAYERS:
        history = client.get_metric_history(run.info.run_id, f"gengram/layer{layer}/gate_open_fraction")
        out[f"gate open fraction layer {layer}, last"] = max(history, key=lambda m: m.step).value
    for key in ("loss", "lm_loss", "val_loss"):
        out[f"final {key}"] = run.data.metrics[key]
    waits = client.get_metric_history(run.info.run_id, "data_wait_fraction")
    out["data_wait_fraction, mean"] = statistics.fmean(m.value for m in waits)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="34039d7^", help="commit to compare with (default: before the MoE change)")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moe-balance-") as scratch:
        scratch = Path(scratch)
        before_tree = scratch / "before-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = figures(quickstart(before_tree, scratch / "before", args.steps))
            after = figures(quickstart(ROOT, scratch / "after", args.steps))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, check=False)
    label = f"before ({args.before})"
    print(f"\nquickstart, debug flavour, {args.steps} steps, 2 workers\n")
    print(f"{'':<36} {label:>18} {'after (this tree)':>18}")
    for key in before:
        print(f"{key:<36} {before[key]:>18.4f} {after[key]:>18.4f}")


if __name__ == "__main__":
    main()
